"""The model core against nanochat itself: real checkpoints written by nanochat at two commits
(shared/oracle/orig is G0, shared/oracle/head is G4), loaded through the discovery a user would use."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import find_checkpoint, open_checkpoint
from core.generation import SamplingParams, generate
from core.gpt import TorchRunner, build_gpt
from tests.support.oracles import oracle_or_skip, references


@pytest.fixture(scope="module", params=["head", "orig"])
def oracle(request, monkeypatch_module):
    base = oracle_or_skip(request.param)
    monkeypatch_module.setenv("NANOCHAT_BASE_DIR", str(base))
    ref = find_checkpoint("base")  # default tag (largest d<N>) and step (the last), as nanochat picks them
    loaded, tok = open_checkpoint(ref)
    refs = references(request.param)
    return base, refs, build_gpt(loaded.config, loaded.state_dict), tok, loaded


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_discovery_and_generation(oracle):
    _, refs, _, _, loaded = oracle
    assert loaded.ref.model_tag == refs["model_tag"] and loaded.ref.step == refs["step"]
    assert loaded.config.generation == {"head": "G4", "orig": "G0"}[Path(loaded.ref.directory).parts[-3]]
    if refs.get("window_sizes"):
        assert loaded.config.window_sizes() == [w for w, _ in refs["window_sizes"]]


def test_prompts_render_as_nanochat(oracle):
    _, refs, _, tok, _ = oracle
    for conv in refs["conversations"]:
        assert tok.render_for_completion(conv["messages"]) == conv["prompt_ids"], conv["name"]


def test_logits_match_nanochat(oracle):
    base, refs, model, _, _ = oracle
    for conv in refs["conversations"]:
        ids = conv["prompt_ids"]
        runner = TorchRunner(model, max_slots=1, max_seq=len(ids))
        last = runner.forward(np.array([ids]), np.array([0]), np.array([0]))[0]
        want_last = np.load(base / conv["forward_logits"]["file_last"])
        assert np.abs(last - want_last).max() < 1e-4, conv["name"]
        full = model.full_logits(ids).numpy()
        want_full = np.load(base / conv["forward_logits"]["file_full"])
        assert np.abs(full - want_full).max() < 1e-4, conv["name"]


def test_greedy_generation_matches_nanochat(oracle):
    _, refs, model, tok, _ = oracle
    for conv in refs["conversations"]:
        runner = TorchRunner(model, max_slots=1, max_seq=512)
        tokens = [t for t, _ in generate(runner, tok, conv["prompt_ids"], SamplingParams(0.0, None, 32, 0))]
        assert tokens == conv["greedy"]["tokens"], conv["name"]
        assert tok.decode(tokens) == conv["greedy"]["text"]


def test_seeded_sampling_matches_nanochat(oracle):
    _, refs, model, tok, _ = oracle
    for conv in refs["conversations"]:
        want = conv["sampled_t1_k50_seed42"]
        p = want["params"]
        params = SamplingParams(p["temperature"], p["top_k"], p["max_tokens"], p["seed"])
        runner = TorchRunner(model, max_slots=1, max_seq=512)
        assert [t for t, _ in generate(runner, tok, conv["prompt_ids"], params)] == want["tokens"], conv["name"]


def test_batched_rows_match_single_rows(oracle):
    """Rows decoded together in one call, at different positions, equal each row alone."""
    _, refs, model, _, _ = oracle
    convs = refs["conversations"][:3]
    runner = TorchRunner(model, max_slots=4, max_seq=512)
    for slot, conv in enumerate(convs):
        runner.forward(np.array([conv["prompt_ids"]]), np.array([0]), np.array([slot]))
    nxt = np.array([[c["greedy"]["tokens"][0]] for c in convs])
    pos = np.array([len(c["prompt_ids"]) for c in convs])
    batched = runner.forward(nxt, pos, np.arange(len(convs)))
    for i, conv in enumerate(convs):
        ids = [*conv["prompt_ids"], conv["greedy"]["tokens"][0]]
        alone = model.full_logits(ids)[-1].numpy()
        assert np.abs(batched[i] - alone).max() < 1e-4
    assert torch.equal(torch.from_numpy(batched).argmax(-1), torch.tensor([c["greedy"]["tokens"][1] for c in convs]))
