"""Helpers for tests against the local Triton server."""

from __future__ import annotations

import os

import psutil


def stub_process(server, model: str) -> psutil.Process:
    """The Python backend stub that runs `model` (its one instance) under a LocalTriton."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if any(f"/{model}/1/model.py" in a for a in p.cmdline()))


def in_session(sid: int) -> list[psutil.Process]:
    """Live processes of session `sid` (a LocalTriton's server leads its own; its backend stubs are in it)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out
