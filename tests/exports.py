"""
Exports that tests need, made side by side: tracing is single-threaded Python (~5-15 s a model), so a
session's exports take half the time in two worker processes on two cores. Each worker runs the project's
own export_model, exactly as a test calling it in-process would.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from export import ExportOptions, export_model


def export_quietly(opts: ExportOptions) -> Path:
    return export_model(opts, log=lambda _: None)


def export_all(jobs: list[ExportOptions]) -> list[Path]:
    """export_model for each job, as many at once as this process has CPUs (at most one per job)."""
    workers = min(len(jobs), len(os.sched_getaffinity(0)))
    if workers <= 1:
        return [export_quietly(o) for o in jobs]
    # spawn: the test process has threads (gRPC, ONNX Runtime) that a fork would copy in an unknown state
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(export_quietly, jobs))
