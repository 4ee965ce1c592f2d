"""
Exports that tests need, made side by side: tracing is single-threaded Python (~5-15 s a model), so a
session's exports take half the time in two worker processes on two cores. Each worker runs the project's
own export_model, exactly as a test calling it in-process would. And commands (make export) run to their end
with their peak memory measured as /usr/bin/time -v measures it.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from export import ExportOptions, export_model


def lowered(fp32_path: Path, precision: str, out_dir: Path) -> tuple[Path, object]:
    """A copy of the traced fp32 graph lowered to a precision, as export_model does for PRECISION=; (path, its
    ModelProto without weights)."""
    import shutil

    import onnx

    from export.precision import lower_file

    shutil.copytree(fp32_path.parent, out_dir / precision)
    path = lower_file(out_dir / precision / fp32_path.name, precision)
    return path, onnx.load(str(path), load_external_data=False)


def export_quietly(opts: ExportOptions) -> Path:
    return export_model(opts, log=lambda _: None)


def start_exports(jobs: list[ExportOptions], nice: int = 0) -> tuple[Callable[[], list[Path]], ProcessPoolExecutor]:
    """export_model for each job in worker processes (one per CPU this process may use), started now; returns a
    function that waits for them and gives the model folders, and the pool (to cancel what was never waited for).
    With nice 19 the workers take only the CPU that nothing else wants."""
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0))))
    # spawn: the test process has threads (gRPC, ONNX Runtime) that a fork would copy in an unknown state
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=os.nice,
                               initargs=(nice,))
    futures = [pool.submit(export_quietly, o) for o in jobs]

    def wait() -> list[Path]:
        try:
            return [f.result() for f in futures]
        finally:
            pool.shutdown(cancel_futures=True)

    return wait, pool


def export_all(jobs: list[ExportOptions]) -> list[Path]:
    """export_model for each job, as many at once as this process has CPUs."""
    return start_exports(jobs)[0]() if jobs else []


Measured = tuple[subprocess.CompletedProcess, int]  # the completed process, its peak resident memory in bytes


def start_measured(cmd: list[str], cwd: Path, nice: int = 0,
                   timeout: float = 600) -> tuple[Callable[[], Measured], subprocess.Popen]:
    """Start a command; returns a function that waits for its end and gives (the completed process, the peak
    resident memory in bytes of it and of the processes it waited for), from the kernel's accounting (wait4), and
    the process (to kill if it was never waited for)."""
    # the files outlive this call: wait() reads and closes them
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115
    proc = subprocess.Popen(["nice", "-n", str(nice), *cmd], cwd=cwd, stdout=out, stderr=err, text=True)
    deadline = time.monotonic() + timeout

    def wait() -> Measured:
        while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:  # not proc.wait(): it would reap the usage
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{cmd} ran past {timeout} s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(waited[1])  # so Popen does not wait for it again
        out.seek(0)
        err.seek(0)
        with out, err:
            return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), waited[2].ru_maxrss * 1024

    return wait, proc
