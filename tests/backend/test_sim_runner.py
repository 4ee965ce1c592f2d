"""The simulated GPU runner (backend/sim_runner.py) and its profiles (core/roofline.py): the step time follows the
roofline the notes derive for a d20 on an H100, the runner hands back what the GPU runner does, and a model
repository entry with runtime "sim" builds it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.model_config import EngineConfig, ModelShape
from backend.protocol import METADATA_FILE, VERSION, read_metadata
from backend.runner import make_runner
from backend.sim_runner import SimRunner, text_ids, write_sim_model
from core.device_sampling import BatchSampling
from core.roofline import PROFILES
from core.tokenizer import Tokenizer
from tests.support.oracles import oracle_tokenizer


def test_a_d20_decode_step_on_the_h100_profile_is_what_the_roofline_says():
    """../shared/notes/gpu-hot-path.md: 0.48 B matmul parameters (0.95 GB in bf16) and 102 KB of K/V per token
    (20 layers, 1280 wide); at 3.35 TB/s the weights alone take 0.29 ms. The profile runs them at 70%."""
    h100 = PROFILES["d20-h100"]
    assert 0.47e9 < h100.dense_params() < 0.49e9
    weights_only = h100.step_seconds(np.array([1]), 1) - h100.launch_s
    assert weights_only == pytest.approx(h100.dense_params() * 2 / 3.35e12 / 0.7, rel=0.01)
    # 64 rows at 1,024 tokens: the windows (SSSL) read less K/V than full attention would, never more
    step = h100.step_seconds(np.full(64, 1024), 64) - h100.launch_s
    full = (h100.dense_params() * 2 + 64 * 1024 * 20 * 2 * 1280 * 2) / 3.35e12 / 0.7
    assert weights_only < step <= full
    assert PROFILES["d20-l4"].step_seconds(np.full(64, 1024), 64) > 10 * step  # 300 GB/s against 3.35 TB/s
    assert PROFILES["zero"].step_seconds(np.full(64, 1024), 64) == 0.0


def test_the_runner_returns_text_tokens_and_the_logits_of_exact_rows():
    tok = Tokenizer.load(oracle_tokenizer())
    ids = text_ids(tok)
    assert len(ids) > 100 and not set(ids.tolist()) & set(tok.special_ids.values())
    runner = SimRunner(PROFILES["zero"], 4, 64, tok.vocab_size, ids)
    sampling = BatchSampling(np.ones(3, np.float32), np.zeros(3, np.int64), np.ones(3, np.float32),
                             np.array([False, True, False]))
    drawn = runner.step(np.zeros((3, 1), np.int64), np.array([5, 6, 7]), np.array([0, 1, 2]), sampling)
    assert drawn.tokens.shape == (3,) and set(drawn.tokens.tolist()) <= set(ids.tolist())
    assert drawn.exact_logits.shape == (1, tok.vocab_size)
    with pytest.raises(ValueError, match="exceed the cache"):
        runner.step(np.zeros((1, 8), np.int64), np.array([60]), np.array([0]), sampling.rows(np.array([0])))


def test_a_sim_model_folder_builds_the_runner_its_metadata_names(tmp_path):
    folder = write_sim_model(tmp_path, "sim", oracle_tokenizer(), "d20-l4", 8, 256, EngineConfig())
    meta = read_metadata(folder / VERSION)
    runner = make_runner(ModelShape.from_metadata(meta), folder / VERSION, gpu=False, device_id=0)
    assert isinstance(runner, SimRunner) and runner.profile is PROFILES["d20-l4"] and runner.max_slots == 8
    meta["sim_profile"] = "d20-tpu"
    (folder / VERSION / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sim_profile must be one of"):
        make_runner(ModelShape.from_metadata(meta), folder / VERSION, gpu=False, device_id=0)
