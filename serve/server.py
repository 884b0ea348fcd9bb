"""Start and stop a real ``tritonserver`` on loopback for a model repository.

The binary is ``tritonserver`` on PATH, else the one bundled in the nvidia-pytriton wheel (python backend and
ensembles, CPU), set up as it needs: its backends and caches copied into a private directory with the python
backend stub for the running Python, LD_LIBRARY_PATH pointing at the wheel's libraries and Python's LIBDIR, and
this environment's ``bin`` first on PATH so python models run in this venv (where zsad is installed). Ports are
free ones unless given; the server binds 127.0.0.1 only.

Hardening (clients are not trusted): the shared-memory, model-repository (index, load, unload), trace and logging
APIs, over HTTP and gRPC, need a header ``zsad-admin-key`` whose value is random per start (a client registering a
python stub's own shared-memory region could crash the server). The key never appears in any process's argv or
environment: it lives in an owner-only file of the server's run directory (``run_dir``, 0700: ``admin.key`` 0600,
``server.json`` with the endpoints and pid, for ``zsad-deploy``), and a preloaded shim puts it into tritonserver's
arguments before ``main`` (zsad.serve.secret_args); without a C compiler the start is refused unless
``allow_key_in_argv``. Models are loaded
in explicit model-control mode so that a monitor thread can reload a model whose python stub process died (Triton
itself never restarts it and keeps reporting ready); if the reload fails, ``healthy`` turns false and ``ready()``
with it. ``stop`` sends SIGTERM to tritonserver (which unloads its models and frees its /dev/shm regions within
its --exit-timeout-secs), SIGKILLs its process group if it overruns, and removes any python-backend region of this
server left behind. tritonserver gets SIGTERM if the thread that started it dies (Linux PR_SET_PDEATHSIG): a
SIGKILLed zsad-serve leaves no server behind.

Graceful drain (``drain``, zsad-serve on SIGTERM): ``ready()`` turns false first, then every model is unloaded,
ensembles before the models they call. Measured on the bundled 2.51: SIGTERM alone refuses new connections but keeps
serving requests on open keep-alive connections until --exit-timeout-secs, then exits with the requests in flight
unanswered (4 of 4 lost at 4 clients); an unloaded model instead finishes what it accepted (state UNLOADING until
then) and refuses new requests at once ("... has no available versions"), and strict readiness turns false.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from zsad import ZsadError

log = logging.getLogger("zsad.serve")

ADMIN_HEADER = "zsad-admin-key"
# APIs a client has no business with: shared memory (a stub's own region can be registered), repository control,
# tracing and logging settings
RESTRICTED_APIS = "shared-memory,model-repository,trace,logging"
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_NAME = b"triton_python_backend_stub"
PORT_TRIES = 3  # starts of one server when a port picked for it was taken before tritonserver bound it
EXIT_TIMEOUT_S = 5  # tritonserver's own wait for in-flight requests on SIGTERM
# tritonserver options zsad sets itself and relies on: given again in extra_args (tritonserver takes the last one)
# with another value they would break it (readiness polled on the wrong port, no reloads), so they are refused.
# name: (the values that change nothing, why). Restricted-API specs are not here: tritonserver adds another
# category's spec to zsad's and refuses to start on one naming a category zsad restricts.
_TRUE = ("true", "on", "1")
OWN_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "--http-port": ((), "give the port as zsad-serve --http-port (TritonServer's http_port)"),
    "--grpc-port": ((), "give the port as zsad-serve --grpc-port (TritonServer's grpc_port)"),
    "--metrics-port": ((), "give the port as zsad-serve --metrics-port (TritonServer's metrics_port)"),
    "--model-control-mode": (("explicit",), "the stub monitor's reloads and zsad-deploy need explicit model control"),
    "--allow-http": (_TRUE, "readiness is checked over HTTP"),
    "--strict-readiness": (_TRUE, "ready must mean every model is loaded"),
}
DRAIN_TIMEOUT_S = 30.0  # how long ``drain`` waits for accepted requests to finish
SERVER_STATE, KEY_FILE, UPDATE_LOCK = "server.json", "admin.key", "update.lock"  # in the run directory


def default_run_dir(repo: str | Path) -> Path:
    """Where zsad-serve keeps the run files of the server of ``repo`` (one per repository), found again from the
    repository alone by ``zsad-deploy``: $XDG_RUNTIME_DIR (else the temp dir)/zsad-serve-<uid>/<hash of its path>."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"zsad-serve-{os.getuid()}"
    return base / hashlib.sha256(str(Path(repo).resolve()).encode()).hexdigest()[:16]


def private_dir(path: Path, create: bool) -> Path:
    """``path`` as a directory this user owns that nobody else can enter (created 0700 with its parent if
    ``create``). A shared temp dir lets others create it first, so ownership and modes are checked, not assumed:
    the parent must be ours and closed to others too, or root's and sticky (like /tmp)."""
    if create:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    if not path.is_dir():
        raise ZsadError(f"{path} does not exist (is zsad-serve running on this repository?)")
    st, up = os.lstat(path), os.lstat(path.parent)
    ours = not path.is_symlink() and st.st_uid == os.getuid() and not st.st_mode & 0o077
    parent_safe = (up.st_uid == os.getuid() and not up.st_mode & 0o022) or \
        (up.st_uid == 0 and (not up.st_mode & 0o002 or up.st_mode & stat.S_ISVTX))
    if not (ours and parent_safe):
        raise ZsadError(f"{path} is not a private directory of this user (owner uid {st.st_uid}, mode "
                        f"{oct(st.st_mode & 0o777)}; parent owner uid {up.st_uid}, mode {oct(up.st_mode & 0o7777)}): "
                        f"refusing to keep or read the admin key there")
    return path


def die_with_parent() -> None:
    """SIGTERM this process when the thread that started it exits (Linux prctl PR_SET_PDEATHSIG): a preexec_fn for
    tritonserver, the first call of a zsad-bench worker."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: the server outlives a killed parent (stop() still ends it)


class Stub(NamedTuple):
    model: str
    # Triton's instance name (<model>_<group>_<index>, the same for every version of a model; the model's own name
    # for the stub that completes its config at load)
    instance: str
    region: str  # its shared-memory region
    version: str


def python_stubs(server_pid: int) -> dict[int, Stub]:
    """The live python-backend stub processes of a server: {pid: Stub}.

    A stub's argv is [stub, <repo>/<model>/<version>/model.py, <shm region>, ..., <instance name>, ...]."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            if stat[0] == "Z" or int(stat[1]) != server_pid:  # zombie (dead, not reaped yet) / not ours
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if argv and argv[0].endswith(STUB_NAME) and len(argv) > 8:
            version = Path(argv[1].decode(errors="replace")).parent
            out[int(entry)] = Stub(version.parent.name, argv[8].decode(errors="replace"),
                                   argv[2].decode(errors="replace"), version.name)
    return out


def free_ports(n: int, taken: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free loopback ports, none in ``taken``. The sockets stay bound until all are picked: picking
    them one at a time can hand out the same port twice (the OS reuses a just-released ephemeral port)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in taken and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def port_bindable(port: int) -> bool:
    """Nothing listens on ``port`` that would stop a bind on 127.0.0.1 (loopback or any address). SO_REUSEADDR as
    servers set it: a port left in TIME_WAIT by a stopped server counts as free, as it is to tritonserver."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class ServerBinary:
    path: Path
    backend_dir: Path | None  # None: the binary's own default
    cache_dir: Path | None
    env: dict


def _bundled_binary(workdir: Path) -> ServerBinary:
    try:
        import pytriton
    except ImportError as err:
        raise ZsadError("no tritonserver on PATH and nvidia-pytriton is not installed: pip install 'zsad[serve]' "
                        "(it bundles a CPU tritonserver with the python backend)") from err
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise ZsadError(f"nvidia-pytriton's bundled server is incomplete for Python "
                        f"{sys.version_info.major}.{sys.version_info.minor}: {binary} / {stub}")
    backends, caches = workdir / "backends", workdir / "caches"
    shutil.copytree(root / "backends", backends)
    if (root / "caches").is_dir():
        shutil.copytree(root / "caches", caches)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libs = [str(root.parent.parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env = {"LD_LIBRARY_PATH": os.pathsep.join([p for p in libs if p] + [os.environ.get("LD_LIBRARY_PATH", "")])}
    return ServerBinary(binary, backends, caches if caches.is_dir() else None, env)


class TritonServer:
    """``with TritonServer(repo) as server: ...`` -> a ready server at ``server.http_url`` / ``server.grpc_url``."""

    def __init__(self, repo: str | Path, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, binary: str | None = None, startup_timeout: float = 180.0,
                 log_verbose: int = 0, extra_args: list[str] | None = None, monitor_interval: float = 0.5,
                 run_dir: str | Path | None = None, allow_key_in_argv: bool = False):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ZsadError(f"model repository not found: {self.repo}")
        self._given_ports = (http_port, grpc_port, metrics_port)
        self._pick_ports()
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise ZsadError(f"HTTP, gRPC and metrics need three different ports, got {self._given_ports}")
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        for name, (harmless, why) in OWN_OPTIONS.items():
            value = _option_value(self.extra_args, name)  # what tritonserver would read: the last one
            if value is not None and value.lower() not in harmless:
                raise ZsadError(f"tritonserver argument {name} {value} overrides an option zsad sets itself: {why}")
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.monitor_interval = monitor_interval
        self._admin_key = secrets.token_hex(16)
        self.healthy = True  # false once a dead stub's model could not be reloaded
        self.events: list[dict] = []  # stub deaths seen by the monitor: model, pid, detected/reloaded times
        self._stop_monitor = threading.Event()
        self._monitor: threading.Thread | None = None
        self._shm_regions: set[str] = set()  # every python-backend region this server's stubs were given
        self.run_dir = Path(run_dir) if run_dir is not None else None  # None: the private work dir
        self.allow_key_in_argv = allow_key_in_argv
        self.draining = False
        self._run_files: list[Path] = []  # what start() wrote into run_dir (stop() removes exactly these)
        self._made_run_dir = False

    def _pick_ports(self) -> None:
        """The given ports, and free ones for those not given."""
        given = self._given_ports
        picked = iter(free_ports(sum(p is None for p in given), tuple(p for p in given if p)))
        self.http_port, self.grpc_port, self.metrics_port = (p or next(picked) for p in given)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise ZsadError("the Triton server has not been started: it has no log yet")
        return self._workdir / "tritonserver.log"

    def _resolve_binary(self, workdir: Path) -> ServerBinary:
        path = self.binary or shutil.which("tritonserver")
        if path:
            return ServerBinary(Path(path), None, None, {})
        return _bundled_binary(workdir)

    def start(self) -> TritonServer:
        """Start tritonserver and wait until it is ready. A free port picked here can be taken by another process
        before tritonserver binds it (two servers starting at once draw from the same pool): that start is retried
        with fresh ports, up to PORT_TRIES starts; a port the caller gave is never replaced."""
        self._refuse_given_ports_in_use()
        for tries_left in range(PORT_TRIES - 1, -1, -1):
            try:
                return self._start_once()
            except ZsadError as err:
                in_use = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)' already in use", str(err))}
                if not tries_left or not in_use or in_use & {p for p in self._given_ports if p}:
                    raise
                taken = (self.http_port, self.grpc_port, self.metrics_port)
                self._pick_ports()
                log.warning("a port picked for tritonserver was taken before it bound (ports %s); starting again on "
                            "%s", taken, (self.http_port, self.grpc_port, self.metrics_port))
        raise AssertionError("unreachable")

    @property
    def metrics_on(self) -> bool:
        """tritonserver's own reading of ``--allow-metrics`` in extra_args: either form, its bool words in any case
        (anything else makes it refuse to start)."""
        return (_option_value(self.extra_args, "--allow-metrics") or "true").lower() not in ("false", "off", "0")

    def _refuse_given_ports_in_use(self) -> None:
        """A given port another process listens on is refused before tritonserver starts: else a server already on
        it (an earlier Triton, say) would answer the readiness checks while this one loads, then this one would exit
        on the bind, with an error about something else."""
        names = ("HTTP", "gRPC", "metrics" if self.metrics_on else None)
        for name, port in zip(names, self._given_ports, strict=True):
            if name and port and not port_bindable(port):
                raise ZsadError(f"the {name} port {port} is in use on 127.0.0.1 (another server on it?): stop what "
                                f"listens there or give another port")

    def _start_once(self) -> TritonServer:
        self._workdir = Path(tempfile.mkdtemp(prefix="zsad-triton-"))  # 0700
        if self.run_dir is None:
            self.run_dir = self._workdir
        try:
            self._made_run_dir = not self.run_dir.exists()
            private_dir(self.run_dir, create=True)
            self._claim_run_dir()
            key_env, key_arg = self._key_handover()
            server = self._resolve_binary(self._workdir)
        except BaseException:
            self.stop()  # removes the work dir and what was written into the run dir, nothing else
            raise
        cmd = [str(server.path), f"--model-repository={self.repo}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
               "--metrics-address=127.0.0.1", "--strict-readiness=true", "--exit-on-error=true",
               f"--log-verbose={self.log_verbose}", "--model-control-mode=explicit", "--load-model=*",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
               # p50/p99 request and queue times on /metrics (deploy/monitoring's alerts and dashboard read them)
               "--metrics-config=summary_latencies=true",
               f"--http-restricted-api={RESTRICTED_APIS}:{ADMIN_HEADER}={key_arg}",
               f"--grpc-restricted-protocol={RESTRICTED_APIS}:{ADMIN_HEADER}={key_arg}"]
        if server.backend_dir:
            cmd.append(f"--backend-directory={server.backend_dir}")
        if server.cache_dir:
            cmd.append(f"--cache-directory={server.cache_dir}")
        cmd += self.extra_args
        env = dict(os.environ, **server.env, **key_env)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(self.log_path, "wb") as logfile:
            self.process = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=die_with_parent)
        self._wait_ready(self.process)
        self._check_key()
        self._write_run_file(SERVER_STATE, json.dumps({
            "pid": os.getpid(), "tritonserver_pid": self.process.pid, "repo": str(self.repo),
            "http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url}, indent=2))
        self._stop_monitor.clear()  # set by the stop() of a failed start before this one
        self._monitor = threading.Thread(target=self._watch_stubs, name="zsad-stub-monitor", daemon=True)
        self._monitor.start()
        return self

    def _claim_run_dir(self) -> None:
        """Refuse a run directory another live server uses (its server.json names a running process)."""
        assert self.run_dir is not None
        state = self.run_dir / SERVER_STATE
        if state.is_file():
            try:
                pid = int(json.loads(state.read_text())["pid"])
                os.kill(pid, 0)
            except (ValueError, KeyError, TypeError, ProcessLookupError):
                pass  # a crashed run's file: replaced below
            except PermissionError:
                raise ZsadError(f"{state} names a process of another user") from None
            else:
                raise ZsadError(f"another zsad-serve (pid {pid}) is serving from {self.run_dir} ({state}): stop it, "
                                f"or give this one another run directory") from None
        for name in (SERVER_STATE, KEY_FILE, UPDATE_LOCK):
            (self.run_dir / name).unlink(missing_ok=True)
        self._write_run_file(UPDATE_LOCK, "")

    def _write_run_file(self, name: str, text: str) -> Path:
        from zsad.serve.secret_args import write_secret

        assert self.run_dir is not None
        path = self.run_dir / name
        write_secret(path, text)  # 0600 from creation
        self._run_files.append(path)
        return path

    def _key_handover(self) -> tuple[dict, str]:
        """(environment, the key argument's value) that get the admin key to tritonserver: the key file and the
        preloaded shim (zsad.serve.secret_args) with a placeholder in argv, or, if ``allow_key_in_argv`` and no
        compiler, the key itself in argv (loudly)."""
        from zsad.serve import secret_args

        key_file = self._write_run_file(KEY_FILE, self._admin_key)
        if secret_args.compiler() is None and self.allow_key_in_argv:
            log.warning("no C compiler: the admin key is on tritonserver's command line, readable by every local "
                        "user with ps (--allow-key-in-argv)")
            return {}, self._admin_key
        assert self._workdir is not None
        return secret_args.shim_env(secret_args.build_shim(self._workdir), key_file), secret_args.PLACEHOLDER

    def _check_key(self) -> None:
        """The restricted APIs must take the real key (and so not the public placeholder): else the shim did not
        run (e.g. a statically linked tritonserver) and the server is stopped."""
        try:
            self.models()
        except urllib.error.HTTPError as err:
            self.stop()
            raise ZsadError(f"tritonserver refuses the admin key ({err.code}): the shim that hands it over "
                            f"(LD_PRELOAD) did not run for {self.binary or 'this binary'}; pass "
                            f"--allow-key-in-argv to put the key on its command line instead") from None

    def _wait_ready(self, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.startup_timeout
        metrics_on = self.metrics_on
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ZsadError(f"tritonserver exited with code {process.returncode} while starting:\n{tail}")
            # the metrics service binds last, after the HTTP endpoint answers ready, and tritonserver exits when it
            # cannot: a start is done once /metrics answers too
            if self.ready() and (_answers_200(f"http://{self.metrics_url}/metrics") or not metrics_on):
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ZsadError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{tail}")

    def ready(self) -> bool:
        """The server answers ready, is not draining, and no model is left with a dead stub."""
        if not self.healthy or self.draining:
            return False
        return _answers_200(f"http://{self.http_url}/v2/health/ready")

    def _admin(self, path: str, timeout: float = 5):
        """POST to a restricted endpoint with the admin key; returns the decoded JSON body (or None)."""
        return admin_post(self.http_url, self._admin_key, path, timeout)

    def models(self) -> list[dict]:
        """The repository index: [{"name", "version", "state"}, ...]."""
        return self._admin("/v2/repository/index")

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> dict:
        """Stop taking work without losing any: ``ready()`` false, the stub monitor stopped (it must not reload
        what is unloaded here), then every loaded model unloaded; each group's accepted requests finish (Triton
        keeps a model UNLOADING until then, and an accepted ensemble request holds the models it calls) while new
        ones are refused. Ensembles go first so that a refusal names the model the client asked for (2.51 takes an
        ensemble down with its models anyway, measured: the reverse order behaves the same there).
        Returns {"seconds", "drained": every model unloaded within ``timeout``, "left": names not}."""
        t0 = time.monotonic()
        self.draining = True
        self._stop_monitor.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        loaded = sorted({m["name"] for m in self.models() if m.get("state") in ("READY", "LOADING")})
        ensembles = [n for n in loaded if _is_ensemble(self.repo / n / "config.pbtxt")]
        left: list[str] = []
        for group in (ensembles, [n for n in loaded if n not in ensembles]):
            for name in group:
                self._admin(f"/v2/repository/models/{name}/unload")
            left = self._wait_unloaded(group, t0 + timeout)
            if left:
                break
        return {"seconds": round(time.monotonic() - t0, 2), "drained": not left, "left": left}

    def _wait_unloaded(self, names: list[str], deadline: float) -> list[str]:
        """Poll the index until no version of ``names`` is loaded or unloading; returns those still busy."""
        busy = list(names)
        while busy:
            states = self.models()
            # an index entry without a live state (a version folder never loaded: "", UNKNOWN) holds nothing
            busy = sorted({m["name"] for m in states
                           if m["name"] in names and m.get("state") in ("READY", "LOADING", "UNLOADING")})
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return busy

    def _watch_stubs(self) -> None:
        """Every ``monitor_interval`` s: a stub seen before that stays gone for two rounds in a row, no stub in its
        place, while Triton lists its model version as READY both times, died: Triton never restarts it and keeps
        reporting ready, so reload that model, or mark the server unhealthy if the reload fails.
        Left alone: a stub whose version Triton no longer lists as READY, retired by Triton itself (an unload, or
        the old version after a zsad-deploy switch, which Triton unloads only once its accepted requests are done,
        after the switch returned), and a stub gone for one round only (a margin for Triton swapping a model's
        stubs when it reloads changed files). Taking retired stubs, or the config stub Triton starts at each load,
        for dead reloaded the model and refused every request meanwhile (seen in CI after a refused switch)."""
        # the stubs at start too: one that dies before the first interval is seen as well
        known = self._stub_instances() if self.process is not None else {}
        suspects: set[tuple[str, str]] = set()
        while not self._stop_monitor.wait(self.monitor_interval):
            if self.process is None or self.process.poll() is not None:
                return
            if self._update_running():  # a version switch restarts stubs on purpose: look again after it
                known, suspects = {}, set()
                continue
            alive = self._stub_instances()
            gone = {key: seen for key, seen in known.items() if key not in alive}
            if gone:
                try:
                    ready = {(m["name"], str(m.get("version"))) for m in self.models() if m.get("state") == "READY"}
                except (urllib.error.URLError, OSError, ValueError):
                    continue  # Triton did not answer: look again next interval (known kept)
                gone = {key: seen for key, seen in gone.items() if (seen[1].model, seen[1].version) in ready}
            dead = {seen[1].model: seen[0] for key, seen in gone.items() if key in suspects}
            suspects = set(gone) - {key for key, seen in gone.items() if seen[1].model in dead}
            for model, pid in dead.items():
                self._reload(model, pid)
            # the suspects stay known (after a reload too), so that next round sees whether they are still gone
            known = {**(self._stub_instances() if dead else alive), **{key: gone[key] for key in suspects}}

    def _update_running(self) -> bool:
        """A ``zsad-deploy`` switch holds the run directory's update lock (see zsad.serve.deploy)."""
        if self.run_dir is None:
            return False
        try:
            with open(self.run_dir / UPDATE_LOCK) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released when f closes
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _stub_instances(self) -> dict[tuple[str, str], tuple[int, Stub]]:
        """{(instance name, version): (pid, stub)} of the python stubs serving a model instance now (not the
        short-lived stub Triton starts under the model's own name to complete its config at each load: it exits on
        its own); every stub's shared-memory region is remembered for ``stop`` to clean up."""
        assert self.process is not None
        stubs = python_stubs(self.process.pid)
        self._shm_regions |= {stub.region for stub in stubs.values()}
        return {(stub.instance, stub.version): (pid, stub) for pid, stub in stubs.items()
                if stub.instance != stub.model}

    def _reload(self, model: str, pid: int) -> None:
        detected = time.time()
        event = {"model": model, "pid": pid, "detected": detected}
        self.events.append(event)
        log.warning("python stub of model '%s' (pid %d) died; reloading the model", model, pid)
        try:
            # Triton reloads a loaded model only if its files changed since it was loaded (a repository served
            # before: never): unloaded first, the load starts a new stub (measured, tritonserver 2.51)
            self._admin(f"/v2/repository/models/{model}/unload", timeout=120)
            self._admin(f"/v2/repository/models/{model}/load", timeout=120)
            event["reloaded"] = reloaded = time.time()
            log.warning("model '%s' reloaded in %.1f s", model, reloaded - detected)
        except (urllib.error.URLError, OSError, ValueError) as err:
            self.healthy = False
            log.error("model '%s' could not be reloaded (%s): the server is not ready", model, err)

    def log_tail(self, lines: int = 15) -> str:
        """The server's error lines (Triton logs them as E<MMDD> ...) and the last ``lines`` lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in text if re.match(r"E\d{4} ", line)]
        return "\n".join(errors[-20:] + ["..."] + text[-lines:])

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 3.0) -> None:
        """SIGTERM tritonserver (not its stubs: it unloads them itself and frees their shared memory), SIGKILL its
        process group if it has not exited after ``timeout`` s, then remove this server's leftover regions."""
        self._stop_monitor.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        p = self.process
        if p is not None:
            self._shm_regions |= {stub.region for stub in python_stubs(p.pid).values()}
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # stubs of a server that overran or died
            if p.poll() is None:
                p.wait(timeout=10)
        for region in self._shm_regions:
            if region.startswith(SHM_PREFIX) and "/" not in region:
                Path("/dev/shm", region).unlink(missing_ok=True)
        for path in self._run_files:  # only what start() wrote: run_dir may be the user's
            path.unlink(missing_ok=True)
        self._run_files = []
        if self._made_run_dir and self.run_dir is not None and self.run_dir != self._workdir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty
            self._made_run_dir = False
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            if self.run_dir == self._workdir:
                self.run_dir = None
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _option_value(args: Sequence[str], name: str) -> str | None:
    """The value a getopt-style parser reads for ``name`` in ``args``: the last ``name=value`` or ``name value``."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def _answers_200(url: str) -> bool:
    """A GET of ``url`` answers 200 within 2 s (anything else, refused or timed out: False)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def admin_post(http_url: str, key: str, path: str, timeout: float = 5, body: dict | None = None):
    """POST ``body`` (default {}) to a restricted endpoint of the server at ``http_url`` with the admin key;
    returns the decoded JSON answer (or None)."""
    req = urllib.request.Request(f"http://{http_url}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                 headers={ADMIN_HEADER: key, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer = r.read()
    return json.loads(answer) if answer else None


def _is_ensemble(config: Path) -> bool:
    """The model's config.pbtxt says ensemble (parsed as export reads it; a model without one is not)."""
    from zsad.export.versions import read_config

    return config.is_file() and read_config(config).platform == "ensemble"
