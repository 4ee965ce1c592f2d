"""
Fixtures for the export tests: the nanochat oracles, small random checkpoints of every generation,
and exports made once per session (tracing is the slow part, ~5-10 s a model on two cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import oracles
from tests.oracles import oracle_or_skip
from tools.paths import PROJECT as ROOT

GENERATIONS = ("G0", "G1", "G2", "G3", "G4")
# small models; sequence_len 512 puts G3's short window at 256 and G4's at 128, so a 240-token
# prompt plus 32 decode steps runs past the window. G2 uses GQA (4 query heads on 2 kv heads).
DEMO = dict(depth=2, n_embd=64, n_head=2, sequence_len=512)
DEMO_OVERRIDES = {"G2": dict(n_head=4, n_kv_head=2)}


@pytest.fixture(scope="session")
def references():
    return oracles.references


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """A nanochat base dir with one random base checkpoint per generation, tagged g0..g4."""
    from core.random_checkpoint import make_checkpoint

    base = tmp_path_factory.mktemp("nanochat")
    for i, g in enumerate(GENERATIONS):
        make_checkpoint(base, g, tag=g.lower(), source="base", seed=i, **{**DEMO, **DEMO_OVERRIDES.get(g, {})})
    return base


@pytest.fixture(scope="session")
def demo_exports(tmp_path_factory, demo_base):
    """generation -> model folder, exported with export_model (max_slots 3) on first use."""
    from export import export_model, options

    repo, done = tmp_path_factory.mktemp("demo_repository"), {}

    def get(generation: str) -> Path:
        if generation not in done:
            done[generation] = export_model(
                options(model_repository=repo, name=generation.lower(), model=generation.lower(), source="base",
                        nanochat_base_dir=demo_base, runtime="onnx", max_slots=3, verify=False), log=lambda _: None)
        return done[generation]

    return get


def run_measured(cmd: list[str], timeout: float = 300) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command to its end; (the completed process, the peak resident memory in bytes of it and of the
    processes it waited for), from the kernel's own accounting (wait4), as /usr/bin/time -v reports it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:  # not proc.wait(): it would reap the usage
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{cmd} ran past {timeout} s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(waited[1])  # so Popen does not wait for it again
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), waited[2].ru_maxrss * 1024


@pytest.fixture(scope="session")
def make_export_head(tmp_path_factory):
    """`make export` on the head oracle, as a user types it; returns (completed process, repository, peak
    resident memory in bytes)."""
    head = oracle_or_skip("head")
    repo = tmp_path_factory.mktemp("make_export") / "repo"
    proc, peak = run_measured(["make", "export", "MODEL=d4", "SOURCE=base", f"NANOCHAT_BASE_DIR={head}",
                               f"MODEL_REPOSITORY={repo}"])
    return proc, repo, peak


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
