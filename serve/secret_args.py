"""Hand tritonserver a secret on its command line without the secret ever being in its visible argv.

tritonserver 2.51 takes the restricted-API key only as ``--http-restricted-api=<apis>:<header>=<KEY>`` (its ``--help``
lists no file or environment alternative), and a process's argv is readable by every local user (``ps``,
/proc/PID/cmdline). So the command line carries :data:`PLACEHOLDER` instead, and a tiny shared object, compiled at
start with the system C compiler and preloaded (LD_PRELOAD), swaps it for the key before ``main`` runs: glibc calls
.init_array functions with the same (argc, argv, envp) that ``main`` receives; the function reads the key from an
owner-only file (its path in the environment, which /proc shows to the owner only) and points argv[i] at a new heap
string. /proc/PID/cmdline reads the original argument memory, which still holds the placeholder. The function then
removes its variables and LD_PRELOAD from the environment, so the python-backend stubs tritonserver starts inherit
none of them.

If the shim did not run (no compiler, a static binary), the server would guard its APIs with the placeholder, a
public value: :class:`zsad.serve.server.TritonServer` therefore checks after start that the real key is accepted.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from zsad import ZsadError

PLACEHOLDER = "@ZSAD_SECRET@"  # what ps shows where the key goes; never accepted as a key (see TritonServer.start)
FILE_VAR, MARK_VAR = "ZSAD_SECRET_FILE", "ZSAD_SECRET_PLACEHOLDER"  # the names _SHIM_C reads

_SHIM_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void zsad_put_secret(int argc, char **argv, char **envp) {
    (void)envp;
    const char *path = getenv("ZSAD_SECRET_FILE"), *mark = getenv("ZSAD_SECRET_PLACEHOLDER");
    if (!path || !mark || !*mark) return;
    char key[512];
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(key, 1, sizeof key - 1, f) : 0;
    if (f) fclose(f);
    while (n && (key[n - 1] == '\n' || key[n - 1] == '\r')) n--;
    key[n] = 0;
    if (!n) { fprintf(stderr, "zsad: cannot read the secret file %s\n", path); _exit(78); }
    size_t mlen = strlen(mark);
    for (int i = 1; i < argc; i++) {
        char *at = strstr(argv[i], mark);
        if (!at) continue;
        size_t head = (size_t)(at - argv[i]);
        char *s = malloc(strlen(argv[i]) - mlen + n + 1);
        if (!s) _exit(71);
        memcpy(s, argv[i], head);
        memcpy(s + head, key, n);
        strcpy(s + head + n, at + mlen);
        argv[i] = s;  /* main() and getopt see this; /proc/PID/cmdline keeps showing the placeholder */
    }
    memset(key, 0, sizeof key);
    unsetenv("LD_PRELOAD"); unsetenv("ZSAD_SECRET_FILE"); unsetenv("ZSAD_SECRET_PLACEHOLDER");
}

__attribute__((section(".init_array"), used)) static void (*zsad_init)(int, char **, char **) = zsad_put_secret;
"""


def compiler() -> str | None:
    """The system C compiler (``cc``, else ``gcc`` / ``clang``), or None."""
    return next((c for c in map(shutil.which, ("cc", "gcc", "clang")) if c), None)


def build_shim(workdir: Path) -> Path:
    """Compile the shim into ``workdir`` (private to this user); raises ZsadError without a working compiler."""
    cc = compiler()
    if cc is None:
        raise ZsadError("no C compiler (cc, gcc or clang) to build the shim that keeps the admin key off "
                        "tritonserver's command line: install one (apt-get install gcc libc6-dev), or pass "
                        "--allow-key-in-argv to accept that every local user can read the key with ps")
    src, lib = workdir / "zsad_secret_args.c", workdir / "zsad_secret_args.so"
    src.write_text(_SHIM_C)
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise ZsadError(f"compiling the admin-key shim with {cc} failed (pass --allow-key-in-argv to run without "
                        f"it):\n{res.stderr[-1500:]}")
    return lib


def write_secret(path: Path, secret: str) -> None:
    """``secret`` into a new file only its owner can read (0600 from creation, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


def shim_env(lib: Path, secret_file: Path) -> dict[str, str]:
    """The environment entries that make the preloaded shim put the secret of ``secret_file`` in place."""
    preload = " ".join(p for p in (str(lib), os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, FILE_VAR: str(secret_file), MARK_VAR: PLACEHOLDER}
