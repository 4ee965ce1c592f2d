"""Helpers for tests against the local Triton server."""

from __future__ import annotations

import psutil


def stub_process(server, model: str) -> psutil.Process:
    """The Python backend stub that runs `model` (its one instance) under a LocalTriton."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if any(f"/{model}/1/model.py" in a for a in p.cmdline()))
