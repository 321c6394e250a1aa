"""Start a real ``tritonserver`` on a model repository, in a subprocess, and wait until it is ready.

Where the binary comes from (:func:`find_tritonserver`), first match wins:

1. ``$SDTM_TRITONSERVER``: a Triton install folder with ``bin/tritonserver`` and ``backends/`` (e.g.
   ``/opt/tritonserver`` in NGC's images, which have the ONNX Runtime, TensorRT and Python backends);
2. ``/opt/tritonserver``;
3. PyTriton's wheel (``pip install --no-deps nvidia-pytriton``): ``tritonserver`` 2.51 with the Python backend
   only. Its Python backend stub embeds ``libpython3.X``; we point it at the running interpreter's (so model code
   sees this environment's packages) and give it the wheel's bundled libraries. ``--no-deps`` because the wheel
   pins ``numpy<2``, which its stub needs only for ``as_numpy()``; our models use DLPack instead.

What this machine runs (2 CPU cores, no GPU): 3., with the engines on our Python runner of ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServerDistribution", "ServerUnavailable", "ServerStartError", "TritonServer", "find_tritonserver"]

logger = logging.getLogger(__name__)


class ServerUnavailable(RuntimeError):
    """No ``tritonserver`` that can run here: the message says what is missing and how to get it."""


class ServerStartError(RuntimeError):
    """``tritonserver`` exited or was not ready in time; the message carries the log's error lines."""


@dataclass(frozen=True)
class ServerDistribution:
    """A ``tritonserver`` binary, its backends folder and the environment it needs."""

    binary: Path
    backends: Path
    env: dict[str, str] = field(default_factory=dict)
    origin: str = ""

    @property
    def has_onnxruntime_backend(self) -> bool:
        return (self.backends / "onnxruntime").is_dir()


def _pytriton_distribution(work: Path) -> ServerDistribution:
    # find_spec does not import pytriton (its __init__ loads its client API, which --no-deps may leave
    # without its dependencies): only the wheel's files are used
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.submodule_search_locations is None:
        raise ServerUnavailable(
            "no tritonserver found: set SDTM_TRITONSERVER to a Triton install folder (bin/tritonserver, "
            "backends/), or install PyTriton's wheel, which ships one: pip install --no-deps nvidia-pytriton==0.7.0"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerUnavailable(f"PyTriton ships no Python backend stub for Python {version} ({stub} missing)")
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (Path(libdir) / library).exists():
        raise ServerUnavailable(
            f"this Python ({sys.executable}) has no shared libpython{version}, which PyTriton's Python backend "
            "stub embeds: use a Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    env = {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, str(libs), os.environ.get("LD_LIBRARY_PATH")) if p)}
    return ServerDistribution(dist / "bin" / "tritonserver", backends, env, f"PyTriton wheel ({root})")


def find_tritonserver(work: Path) -> ServerDistribution:
    """The ``tritonserver`` to run (see the module docstring); ``work`` is a scratch folder for PyTriton's."""
    for root in (os.environ.get("SDTM_TRITONSERVER"), "/opt/tritonserver"):
        if root and (Path(root) / "bin" / "tritonserver").exists():
            return ServerDistribution(Path(root) / "bin" / "tritonserver", Path(root) / "backends", {}, root)
        if root and root == os.environ.get("SDTM_TRITONSERVER"):
            raise ServerUnavailable(f"SDTM_TRITONSERVER={root}: no bin/tritonserver there")
    return _pytriton_distribution(work)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` on ``repository`` in a subprocess; a context manager (start on enter, stop on exit).

    Ports default to free ones; ``host`` is the address it listens on (default loopback only; ``"0.0.0.0"`` behind
    a load balancer). The log goes to ``log_path`` (default: a file in the scratch folder); on a failed
    start :class:`ServerStartError` quotes its error lines (a model that failed to load names its reason, e.g.
    the tampered file). Models load at start (``--model-control-mode=none``) and the server exits when one fails
    (``--exit-on-error``): a repository is served whole or not at all.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        distribution: ServerDistribution | None = None,
        extra_args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.repository = Path(repository).resolve()
        # a scratch folder only for what the caller did not give: PyTriton's backends copy and the log
        needs_scratch = distribution is None or log_path is None
        self._scratch = Path(tempfile.mkdtemp(prefix="sdtm-triton-")) if needs_scratch else None
        self.distribution = distribution or find_tritonserver(self._scratch)  # type: ignore[arg-type]
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path) if log_path else self._scratch / "tritonserver.log"  # type: ignore[operator]
        self.extra_args = extra_args
        self.host = host
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "127.0.0.1") else self.host

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self) -> list[str]:
        return [
            str(self.distribution.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.distribution.backends}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--disable-auto-complete-config",
            # one shared-memory region prefix per server: two servers on one machine must not share regions
            f"--backend-config=python,shm-region-prefix-name=sdtm{os.getpid()}p{self.http_port}",
            "--exit-timeout-secs=5",
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and wait until every model is ready (:class:`ServerStartError` otherwise)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("this TritonServer is already running; stop() it first")
        env = {**os.environ, **self.distribution.env}
        logger.info("starting tritonserver (%s) on %s ...", self.distribution.origin, self.repository)
        started = time.perf_counter()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        while time.perf_counter() - started < timeout:
            if self._ready():
                logger.info(
                    "tritonserver ready in %.1f s: HTTP %s, gRPC %s",
                    time.perf_counter() - started,
                    self.http_url,
                    self.grpc_url,
                )
                return self
            if self.process.poll() is not None:
                raise ServerStartError(self._failure(f"tritonserver exited with code {self.process.returncode}"))
            time.sleep(0.25)
        self.kill()
        raise ServerStartError(self._failure(f"tritonserver was not ready within {timeout:.0f} s"))

    def _failure(self, headline: str) -> str:
        def is_error(line: str) -> bool:  # glog's E<date> lines, and the model table's failures; no GPU noise
            glog_error = len(line) > 1 and line[0] == "E" and line[1].isdigit()
            failed = "failed to load" in line or "UNAVAILABLE" in line or line.startswith("error:")
            return (glog_error or failed) and "NVML" not in line and "DCGM" not in line

        lines = [line.strip() for line in self.log().splitlines() if is_error(line)]
        return f"{headline} (log: {self.log_path}):\n" + "\n".join(dict.fromkeys(lines[-12:]))

    def rss_mib(self) -> float | None:
        """Resident memory of the server and its Python backend stubs (its process group), from ``/proc``; ``None``
        where that cannot be read (not Linux, or not running)."""
        if self.process is None or self.process.poll() is not None:
            return None
        total = 0
        try:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if os.getpgid(int(entry.name)) != self.process.pid:
                        continue
                    status = (entry / "status").read_text()
                    total += int(status.split("VmRSS:")[1].split()[0])
        except OSError:
            return None
        return total / 1024

    def stop(self, timeout: float = 20.0) -> None:
        """Stop gracefully (SIGTERM: in-flight requests finish within the exit timeout), then kill."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and its Python backend stubs (a crash, as far as clients can tell)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        """Stop the server and remove its scratch folder (the log with it, unless ``log_path`` was given)."""
        self.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
