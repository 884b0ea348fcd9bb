"""Start and stop a real ``tritonserver`` on loopback for a model repository.

The binary is ``tritonserver`` on PATH, else the one bundled in the nvidia-pytriton wheel (python backend and
ensembles, CPU), set up as it needs: its backends and caches copied into a private directory with the python
backend stub for the running Python, LD_LIBRARY_PATH pointing at the wheel's libraries and Python's LIBDIR, and
this environment's ``bin`` first on PATH so python models run in this venv (where zsad is installed). Ports are
free ones unless given; the server binds 127.0.0.1 only. The server runs in its own process group, so ``stop``
(or leaving the ``with`` block, or SIGTERM to zsad-serve) ends it and everything it started.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from zsad import ZsadError


def free_ports(n: int, taken: tuple[int, ...] = ()) -> list[int]:
    """``n`` distinct free loopback ports, none in ``taken``. The sockets stay bound until all are picked: picking
    them one at a time can hand out the same port twice (the OS reuses a just-released ephemeral port)."""
    socks, ports = [], []
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
                 log_verbose: int = 0, extra_args: list[str] | None = None):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ZsadError(f"model repository not found: {self.repo}")
        given = (http_port, grpc_port, metrics_port)
        picked = iter(free_ports(sum(p is None for p in given), tuple(p for p in given if p)))
        self.http_port, self.grpc_port, self.metrics_port = (p or next(picked) for p in given)
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            raise ZsadError(f"HTTP, gRPC and metrics need three different ports, got {given}")
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "tritonserver.log"

    def _resolve_binary(self) -> ServerBinary:
        path = self.binary or shutil.which("tritonserver")
        if path:
            return ServerBinary(Path(path), None, None, {})
        return _bundled_binary(self._workdir)

    def start(self) -> "TritonServer":
        self._workdir = Path(tempfile.mkdtemp(prefix="zsad-triton-"))
        server = self._resolve_binary()
        cmd = [str(server.path), f"--model-repository={self.repo}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               f"--metrics-port={self.metrics_port}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
               "--metrics-address=127.0.0.1", "--strict-readiness=true", "--exit-on-error=true",
               f"--log-verbose={self.log_verbose}"]
        if server.backend_dir:
            cmd.append(f"--backend-directory={server.backend_dir}")
        if server.cache_dir:
            cmd.append(f"--cache-directory={server.cache_dir}")
        cmd += self.extra_args
        env = dict(os.environ, **server.env)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ZsadError(f"tritonserver exited with code {self.process.returncode} while starting:\n{tail}")
            if self.ready():
                return
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ZsadError(f"tritonserver not ready after {self.startup_timeout:.0f} s:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def models(self) -> list[dict]:
        """The repository index: [{"name", "version", "state"}, ...]."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def log_tail(self, lines: int = 15) -> str:
        """The server's error lines (Triton logs them as E<MMDD> ...) and the last ``lines`` lines."""
        try:
            log = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in log if re.match(r"E\d{4} ", line)]
        return "\n".join(errors[-20:] + ["..."] + log[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it does not exit in ``timeout`` seconds."""
        p = self.process
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
