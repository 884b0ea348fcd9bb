"""The admin-key handover without a server (fast): the preloaded shim puts a file's secret into a program's argv
while /proc/PID/cmdline keeps the placeholder; zsad-serve's run directory is refused when others could read it or
another live server uses it; without a C compiler the start is refused, leaving nothing behind."""
import json
import os
import subprocess

import pytest

from zsad import ZsadError
from zsad.serve import secret_args
from zsad.serve.server import SERVER_STATE, TritonServer, private_dir

needs_cc = pytest.mark.skipif(secret_args.compiler() is None, reason="no C compiler here")


@needs_cc
def test_shim_swaps_the_placeholder_for_the_file_secret_only_in_the_program(tmp_path):
    lib = secret_args.build_shim(tmp_path)
    secret_file = tmp_path / "key"
    secret_args.write_secret(secret_file, "s3cret-value")
    assert os.stat(secret_file).st_mode & 0o777 == 0o600
    # sh sees argv after the shim ran: $1 is the secret spliced into the argument, /proc shows the placeholder,
    # and the shell's own children inherit neither LD_PRELOAD nor the shim's variables
    script = 'printf "%s\\n" "$1"; tr "\\0" " " < /proc/$$/cmdline; echo; env | grep -c -e LD_PRELOAD -e ZSAD_ || true'
    env = {"PATH": os.environ["PATH"], **secret_args.shim_env(lib, secret_file)}
    res = subprocess.run(["sh", "-c", script, "sh", f"--key=a:{secret_args.PLACEHOLDER}:b"], env=env,
                         capture_output=True, text=True, timeout=30)
    value, cmdline, leaked = res.stdout.splitlines()
    assert value == "--key=a:s3cret-value:b"
    assert secret_args.PLACEHOLDER in cmdline and "s3cret" not in cmdline
    assert leaked == "0"


def test_run_dir_must_be_private_and_unused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    with pytest.raises(ZsadError, match="not a private directory"):
        private_dir(shared, create=False)
    run = private_dir(tmp_path / "run", create=True)
    assert os.stat(run).st_mode & 0o777 == 0o700
    (run / SERVER_STATE).write_text(json.dumps({"pid": os.getpid()}))  # a live process claims it
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(ZsadError, match="another zsad-serve"):
        TritonServer(repo, run_dir=run).start()
    assert sorted(p.name for p in run.iterdir()) == [SERVER_STATE]  # its file untouched, nothing added


def test_no_compiler_refuses_to_start_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(secret_args, "compiler", lambda: None)
    repo, run = tmp_path / "repo", tmp_path / "run"
    repo.mkdir()
    with pytest.raises(ZsadError, match="--allow-key-in-argv"):
        TritonServer(repo, run_dir=run).start()
    assert not run.exists()  # made by this start, removed by its cleanup
