"""
Exports that tests need, made side by side: tracing is single-threaded Python (~5-15 s a model), so a
session's exports take half the time in two worker processes on two cores. Each worker runs the project's
own export_model, exactly as a test calling it in-process would.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from export import ExportOptions, export_model


def export_quietly(opts: ExportOptions) -> Path:
    return export_model(opts, log=lambda _: None)


def start_exports(jobs: list[ExportOptions], nice: int = 0) -> Callable[[], list[Path]]:
    """export_model for each job in worker processes (one per CPU this process may use), started now; returns a
    function that waits for them and gives the model folders. With nice 19 the workers take only the CPU that
    nothing else wants."""
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

    return wait


def export_all(jobs: list[ExportOptions]) -> list[Path]:
    """export_model for each job, as many at once as this process has CPUs."""
    return start_exports(jobs)() if jobs else []
