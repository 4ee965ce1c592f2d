"""
Session fixtures that start one real Triton server for every test that needs it (backend and BFF).

    oracle_repository  a model repository in a session temp dir with the two nanochat oracle
                       checkpoints exported as "head" (G4) and "orig" (G0), a small demo checkpoint
                       as "demo" (and, by demo_tools, with samosaChaat's tool channel), "demo_1slot" (a larger
                       demo model with max_slots 1, max_queue 1), and "hf", a transformers NanoChat
                       folder (tests/support/hf_models.py; its metadata.json's checkpoint_path is the folder)
    triton_server      a tools.local_triton.LocalTriton over it with five models loaded (not demo_tools);
                       use .grpc_url / .http_url / .metrics_url
    oracle_references  {"head": references.json, "orig": ...} of ../shared/oracle
    demo_tools, demo_training, generation_exports, head_export, wide_export, image_envs
                       slow preparation started with the session, in the background (BACKGROUND)

Tests that use them are skipped when the oracles or the Triton wheel are missing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.support.oracles import ORACLES, references
from tests.support.tritonkit import DEMO_MAX_SEQ


def export_options(repository: Path, name: str, nanochat_base: Path, source: str, **settings):
    """What tests export a checkpoint with: the project's exporter (export.export_model) into repository/name."""
    from export import options

    return options(model_repository=repository, name=name, nanochat_base_dir=nanochat_base, source=source,
                   verify=False, **settings)


@pytest.fixture(scope="session")
def oracle_references() -> dict:
    return {name: references(name) for name in ORACLES}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """The nanochat base dir of the small demo checkpoint (G4, two layers)."""
    from core.random_checkpoint import make_checkpoint

    base = tmp_path_factory.mktemp("demo_checkpoint")
    make_checkpoint(base, "G4", depth=2, n_embd=64, sequence_len=DEMO_MAX_SEQ)
    return base


@pytest.fixture(scope="session")
def oracle_repository(tmp_path_factory, oracle_references, demo_checkpoint) -> Path:
    from core.random_checkpoint import make_checkpoint
    from tests.support.exports import export_all
    from tests.support.hf_models import write_oracle_model

    repo = tmp_path_factory.mktemp("model_repository")
    jobs = [export_options(repo, name, base, "base", max_slots=16, max_seq=512, max_queue=64, prefill_chunk=256)
            for name, base in ORACLES.items()]
    jobs.append(export_options(repo, "demo", demo_checkpoint, "sft", max_slots=4, max_seq=DEMO_MAX_SEQ, max_queue=8,
                               prefill_chunk=64))
    # head-sized, so a request holds its one slot long enough (seconds) for queueing and cancelling tests
    slow_base = tmp_path_factory.mktemp("slow_checkpoint")
    make_checkpoint(slow_base, "G4", depth=4, n_embd=256, n_head=4, sequence_len=1024)
    jobs.append(export_options(repo, "demo_1slot", slow_base, "sft", max_slots=1, max_seq=1024, max_queue=1,
                               prefill_chunk=64))
    # a transformers NanoChat folder as transformers saves it (sharded), over the oracles' tokenizer
    hf = write_oracle_model(tmp_path_factory.mktemp("hf_nanochat"), max_shard_size="1MB")
    jobs.append(export_options(repo, "hf", None, None, checkpoint_dir=hf, max_slots=2, max_seq=DEMO_MAX_SEQ,
                               max_queue=8, prefill_chunk=64))
    export_all(jobs)
    return repo


@pytest.fixture(scope="session")
def demo_tools(oracle_repository, demo_checkpoint):
    """The demo model calling tools as samosaChaat's fine-tunes do (JSON calls, web_search), with a context that
    holds a search result (what `make serve` shows), exported as "demo_tools" into the session's repository in a
    worker process; returns a function that waits for it. One test serves it, so it is no part of the first
    tests' wait."""
    from tests.support.exports import start_exports

    wait, pool = start_exports([export_options(oracle_repository, "demo_tools", demo_checkpoint, "sft", max_slots=2,
                                               max_seq=4 * DEMO_MAX_SEQ, tool_channel="registry")], nice=19)
    yield wait
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="session")
def demo_training(tmp_path_factory):
    """`make demo`'s training (python -m tools.train_demo, about a minute on one core) in a process of its own;
    returns a function that waits for it and gives (nanochat base dir, its output lines)."""
    import subprocess
    import sys

    from tools.paths import PROJECT

    out = tmp_path_factory.mktemp("trained_demo")
    log = out / "train_demo.log"
    with open(log, "w") as f:  # niced: see start_background_work
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "tools.train_demo", "--out", str(out)],
                                cwd=PROJECT, stdout=f, stderr=subprocess.STDOUT)

    def wait() -> tuple[Path, list[str]]:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        return out, log.read_text().splitlines()

    yield wait
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def generation_exports(tmp_path_factory):
    """Every generation oracle (../shared/oracle/generations) exported with its overrides, in worker processes;
    returns a function that waits for them and gives name -> model folder."""
    import numpy as np

    from tests.support.exports import start_exports
    from tests.support.oracles import checkpoint_with_tokenizer, generation_oracle, generation_oracles, overrides_of

    names, jobs = generation_oracles(), []
    for name in names:
        folder, entry = generation_oracle(name)
        ckpt = checkpoint_with_tokenizer(name, tmp_path_factory.mktemp(name) / "checkpoint")
        jobs.append(export_options(tmp_path_factory.mktemp("repo"), "m", None, None, checkpoint_dir=ckpt,
                                   runtime="onnx", max_slots=2, max_seq=len(np.load(folder / "ids.npy")),
                                   overrides=tuple(overrides_of(entry))))
    wait, pool = start_exports(jobs, nice=19) if jobs else (list, None)  # niced: see start_background_work
    yield lambda: dict(zip(names, wait(), strict=True))
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)  # a session that ended before the tests that wait


@pytest.fixture(scope="session")
def head_export(tmp_path_factory):
    """`make export` on the head oracle, as a user types it; returns a function that waits for it and gives
    (completed process, repository, peak resident memory in bytes: the export's fixed cost, the head being
    small)."""
    from tests.support.exports import start_measured
    from tests.support.oracles import oracle_or_skip
    from tools.paths import PROJECT

    head, repo = oracle_or_skip("head"), tmp_path_factory.mktemp("make_export") / "repo"
    wait, proc = start_measured(["make", "export", "MODEL=d4", "SOURCE=base", f"NANOCHAT_BASE_DIR={head}",
                                 f"MODEL_REPOSITORY={repo}"], PROJECT, nice=19)  # niced: see start_background_work
    yield lambda: (lambda done, peak: (done, repo, peak))(*wait())
    stop_unwaited(proc)


@pytest.fixture(scope="session")
def wide_export(tmp_path_factory):
    """A model of a d20's width in its largest tensors (vocabulary 65,536, C=1024: 227 M parameters, 0.9 GB fp32)
    exported as `make export` runs it; returns a function that waits and gives (completed process, model folder,
    peak resident memory in bytes)."""
    import sys

    from core.random_checkpoint import make_checkpoint
    from tests.support.exports import start_measured
    from tools.paths import PROJECT

    base = tmp_path_factory.mktemp("wide")
    make_checkpoint(base / "nanochat", "G4", tag="wide", depth=2, n_embd=1024, n_head=8, vocab_size=65536)
    wait, proc = start_measured([sys.executable, "-m", "export", "--nanochat-base-dir", str(base / "nanochat"),
                                 "--model-repository", str(base / "repo")], PROJECT, nice=19)
    yield lambda: (lambda done, peak: (done, base / "repo" / "wide", peak))(*wait())
    stop_unwaited(proc)


@pytest.fixture(scope="session")
def image_envs(tmp_path_factory):
    """The Triton and BFF images' Python environments (tests/support/images.py), built in the background; returns
    a function that waits for them and gives name -> (venv, source)."""
    from tests.support.images import start_image_envs

    wait, pool = start_image_envs(tmp_path_factory.mktemp, nice=19)  # niced: see start_background_work
    yield wait
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def image_resolutions():
    """What pip would install in each image (tests/support/images.py), resolved against PyPI in the background;
    returns a function that waits for it."""
    from tests.support.images import start_resolutions

    wait, pool = start_resolutions(nice=19)
    yield wait
    pool.shutdown(wait=True, cancel_futures=True)


def stop_unwaited(proc) -> None:
    """A background command that no test waited for (the session ended first) is not left running, nor are its
    children (make export runs Python under make)."""
    if proc.returncode is not None:  # waited for
        return
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
    proc.wait()


# Slow preparation that tests late in the session need, and that no test times: started once the session's Triton
# serves (its exports and model loads are what the first tests wait for: the background took a third of their CPU),
# at the lowest CPU priority, so it runs on the CPU the Triton, BFF and timed tests leave idle, about half of it.
# Peak memory is measured by the kernel per process, so running beside other work does not change it.
FIRST = ("triton_server",)
BACKGROUND = ("demo_tools", "demo_training", "generation_exports", "head_export", "wide_export", "image_envs",
              "image_resolutions")


def pytest_collection_modifyitems(session, config, items) -> None:
    """The modules whose tests wait for background preparation run last, in their order: the preparation gets the
    CPU that the other tests' waits leave idle (servers starting, timeouts, streams), instead of the suite waiting
    for it with nothing else to run. Whole modules move, so their module fixtures are made once."""
    waiting = {item.module for item in items if any(name in item.fixturenames for name in BACKGROUND)}
    items.sort(key=lambda item: item.module in waiting)  # stable: the order within each part stays


@pytest.fixture(scope="session", autouse=True)
def start_background_work(request):
    for name in FIRST + BACKGROUND:
        if any(name in item.fixturenames for item in request.session.items):
            # a missing oracle or Triton wheel, or a server that fails to start: the tests that need it skip (or,
            # in CI, fail) on their own, with the fixture's error; the others run
            with contextlib.suppress(pytest.skip.Exception, Exception):
                request.getfixturevalue(name)


@pytest.fixture(scope="session")
def triton_server(oracle_repository):
    pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel carries the local tritonserver")
    from tools.local_triton import LocalTriton

    with LocalTriton(oracle_repository, load=["head", "orig", "demo", "demo_1slot", "hf"]) as server:
        yield server



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true) a missing prerequisite fails the test instead of skipping it: a run without the
    oracles or the Triton wheel must not pass green. Only what truly needs a GPU (marker `gpu`) may skip."""
    report = (yield).get_result()
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes") \
            and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every prerequisite must be present: {reason}"
