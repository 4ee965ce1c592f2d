"""
A real Triton Inference Server on this machine, from the nvidia-pytriton wheel, serving a model repository with the
nanochat backend. `LocalTriton` (for tests, benchmarks and `make triton`) lays out a backend directory as NVIDIA's
container does, runs `tritonserver` with explicit model control on free ports, waits until the models are ready,
and always stops it. In NVIDIA's container, use docker/triton.Dockerfile instead.

    python -m tools.local_triton --model-repository model_repository --load demo
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from backend.model_config import EngineConfig, config_pbtxt
from backend.protocol import BACKEND, CONFIG_FILE, TRITON_FLAGS
from bff.model_control import ADMIN_HEADER
from tools.paths import PROJECT

BACKEND_SOURCE = PROJECT / "backend" / "model.py"
SYS_PATH_VAR = "NANOCHAT_TRITON_SYS_PATH"
# How the server's CPU time ranks against the machine's other work (Linux scheduling policies; its threads
# and stubs inherit it). "idle" (SCHED_IDLE) gives the model only CPU time that nothing else wants: the
# scheduler runs any other woken task at once, so a BFF beside it answers its probes in milliseconds while
# the model saturates the CPU (a lower nice value does not: the woken task still waits its turn). The price:
# other CPU-bound work on the machine slows the model down to a crawl, and where Triton has CPUs of its own it
# buys nothing and costs latency (its threads wait out each other's time slices). "normal" shares evenly.
PRIORITIES = {"normal": os.SCHED_OTHER, "idle": os.SCHED_IDLE}
BESIDE_BFF_PRIORITY = "idle"  # for a Triton that shares the BFF's CPUs (make serve, make bench's shared run)
# Run by a bare interpreter that then becomes tritonserver (same pid): SIGTERM the server if the process that
# started it dies without stopping it (e.g. SIGKILL), keep it on the given CPUs and give it the priority; its
# threads and stubs inherit all three. Not a preexec_fn: that runs Python in a fork of a process whose gRPC
# threads may be busy (the tests' and tools' own clients), and gRPC aborted such a child.
_PLACE_THEN_EXEC = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
cpus, policy, command = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
if policy != os.SCHED_OTHER:  # a process may lower its priority, not raise it: "normal" keeps the caller's
    os.sched_setscheduler(0, policy, os.sched_param(0))
os.execv(command[0], command)
"""


def pytriton_root() -> Path:
    import pytriton  # the nvidia-pytriton wheel: tritonserver binary, Python backend and stubs

    return Path(pytriton.__file__).parent


def free_ports(count: int, taken: tuple[int | None, ...] = ()) -> list[int]:
    """`count` distinct loopback ports free now, none of `taken`: held open together while they are picked, since
    a port just closed may be handed out again at once (a server once got one port for gRPC and metrics)."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < count:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in taken:
                ports.append(port)
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def make_backend_dir(root: Path) -> Path:
    """Fill root/backends as NVIDIA's container does: python/ (libtriton_python.so, triton_python_backend_utils.py and
    the stub built for this Python, all from the wheel) and nanochat/model.py (backend/model.py)."""
    tritonserver = pytriton_root() / "tritonserver"
    backends = root / "backends"
    python = backends / "python"
    shutil.copytree(tritonserver / "backends" / "python", python, ignore=shutil.ignore_patterns("__pycache__"))
    stub = tritonserver / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(stub / "triton_python_backend_stub", python / "triton_python_backend_stub")
    (backends / BACKEND).mkdir()
    shutil.copy2(BACKEND_SOURCE, backends / BACKEND / "model.py")
    return backends


def stub_sys_path() -> str:
    """Directories the stub's interpreter needs: the project (first, so this checkout wins) and site-packages (whose
    .pth files carry the editable install). The stub ignores PYTHONPATH: backend/model.py reads SYS_PATH_VAR."""
    return os.pathsep.join([str(PROJECT), *site.getsitepackages()])


def derive_model(repository: str | Path, source: str, name: str, **engine: int) -> Path:
    """Add model `name` to a repository: `source`'s artifacts (linked, not copied) with some engine settings
    changed, e.g. derive_model(repo, "head", "head_grouped", stream_interval=4). Only EngineConfig's settings
    can change: the serving shape (max_slots, max_seq) is fixed in the exported graph. config.pbtxt is read
    with Triton's own schema and written again by backend.model_config.config_pbtxt."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repository = Path(repository)
    src, dst = repository / source, repository / name
    config = text_format.Parse((src / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig())
    settings = EngineConfig.from_parameters({k: v.string_value for k, v in config.parameters.items()})
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
    text = config_pbtxt(name, kind, dataclasses.replace(settings, **engine))  # before touching dst: may raise
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for version in (p for p in src.iterdir() if p.is_dir()):
        (dst / version.name).mkdir()
        for f in version.iterdir():
            (dst / version.name / f.name).symlink_to(f.resolve())
    (dst / CONFIG_FILE).write_text(text)
    return dst


class LocalTriton:
    """tritonserver from the nvidia-pytriton wheel over a model repository, with our backend installed."""

    def __init__(self, model_repository: str | Path, load: list[str] = (), http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, verbose: bool = False, cpus: set[int] | None = None,
                 sys_path: list[str] | None = None, admin_key: str | None = None, priority: str = "normal"):
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, not {priority!r}")
        self.model_repository = Path(model_repository).resolve()
        self.load = list(load)
        picked = iter(free_ports(3, taken=(http_port, grpc_port, metrics_port)))
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.cpus = cpus  # the CPUs the server and its backend stubs may run on (default: all)
        self.priority = priority  # a key of PRIORITIES
        self.sys_path = sys_path  # where the backend imports from (default: this checkout and this environment)
        self.admin_key = admin_key  # restricts the repository API (load, unload, index) to calls carrying it
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log = None
        # the shared-memory regions of the Python backend (which runs ours) in /dev/shm: named per server, so
        # stop() can remove what a killed server and its stubs never unlinked
        self.shm_prefix = f"nanochat_triton_{os.getpid()}_{id(self):x}_"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, backends: Path) -> list[str]:
        cmd = [str(pytriton_root() / "tritonserver" / "bin" / "tritonserver"),
               f"--model-repository={self.model_repository}", f"--backend-directory={backends}",
               "--model-control-mode=explicit", f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               # this machine only: whoever reaches Triton can load and unload models and bypass the BFF
               "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
               f"--metrics-port={self.metrics_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
               "--exit-timeout-secs=3", "--strict-readiness=true", f"--log-verbose={int(self.verbose)}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}", *TRITON_FLAGS]
        if self.admin_key:
            restricted = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
            cmd += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
        return cmd + [f"--load-model={name}" for name in self.load]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = Path(pytriton_root()).parent / "nvidia_pytriton.libs"  # the stub does not find them otherwise
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env[SYS_PATH_VAR] = os.pathsep.join(self.sys_path) if self.sys_path else stub_sys_path()
        return env

    def start(self) -> LocalTriton:
        self._tmp = tempfile.TemporaryDirectory(prefix="nanochat-triton-")
        backends = make_backend_dir(Path(self._tmp.name))
        log_path = self.log_path or Path(self._tmp.name) / "tritonserver.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.log_file = log_path
        # own process group, so Ctrl-C in a terminal reaches us first and we stop the server in order
        placed = [sys.executable, "-I", "-S", "-c", _PLACE_THEN_EXEC, ",".join(map(str, sorted(self.cpus or ()))),
                  str(PRIORITIES[self.priority]), *self.command(backends)]
        self.process = subprocess.Popen(placed, env=self.environment(), stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self.wait_ready(self.load)
        except BaseException:
            self.stop()
            raise
        _log_event("triton_started", pid=self.process.pid, grpc=self.grpc_url, http=self.http_url,
                   metrics=self.metrics_url, models=self.load)
        return self

    def wait_ready(self, models: list[str] = (), timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        paths = ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in models]
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}; log: {self.log_tail()}")
            if all(self._http_ok(p) for p in paths):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout or self.startup_timeout}s; "
                                   f"log: {self.log_tail()}")
            time.sleep(0.2)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL to its whole session, stubs included); remove the backend dir."""
        p, self.process = self.process, None
        if p is not None:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=15)
            # Its own session: this also ends backend stubs that outlived the server (a server that
            # crashed, or one that exited before a busy stub did), which would otherwise spin on.
            _kill_session(p.pid)
            p.wait(timeout=10)
            for region in Path("/dev/shm").glob(self.shm_prefix + "*"):
                region.unlink(missing_ok=True)
            _log_event("triton_stopped", pid=p.pid, returncode=p.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of the session and wait until none is left: a killed process takes a
    moment to exit, and a caller that checks right after must not find it running."""
    deadline = time.monotonic() + timeout
    while members := session_members(sid):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {members} of tritonserver session {sid} survived SIGKILL")
        time.sleep(0.05)


def _log_event(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description="Run a local Triton server with the nanochat backend until Ctrl-C.")
    p.add_argument("--model-repository", default="model_repository")
    p.add_argument("--load", action="append", default=[], help="model to load (repeatable)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", help="server log file (default: inside the temporary backend directory)")
    a = p.parse_args()
    server = LocalTriton(a.model_repository, a.load, a.http_port, a.grpc_port, a.metrics_port, a.log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally below on SIGTERM too
    with server:
        try:
            while server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
