"""Checkpoint discovery and loading: nanochat's defaults, other layouts, and every bad input."""

import pickle
import shutil

import pytest
import torch

from core.checkpoint import CheckpointError, find_checkpoint, open_checkpoint
from core.random_checkpoint import make_checkpoint, train_tokenizer, write_tokenizer

SMALL = dict(depth=2, n_embd=64, n_head=2, sequence_len=128, window_pattern="L")


@pytest.fixture
def base(tmp_path):
    make_checkpoint(tmp_path, "G4", tag="d2", source="sft", step=100, seed=1, **SMALL)
    make_checkpoint(tmp_path, "G4", tag="d2", source="sft", step=250, seed=2, **SMALL)
    make_checkpoint(tmp_path, "G1", tag="d12_small", source="sft", step=5, seed=3, **SMALL)
    return tmp_path


def test_defaults_pick_the_largest_depth_and_the_last_step(base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    ref = find_checkpoint("sft")
    assert (ref.model_tag, ref.step) == ("d12_small", 5)
    ref = find_checkpoint("sft", model_tag="d2")
    assert ref.step == 250 and ref.tokenizer_path == base / "tokenizer" / "tokenizer.pkl"
    assert open_checkpoint(find_checkpoint("sft", "d2", step=100))[0].config.generation == "G4"


def test_plain_directory_with_tokenizer_beside_or_shared(base, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    shutil.copytree(base / "chatsft_checkpoints" / "d2", storage / "d20")
    with pytest.raises(CheckpointError, match=r"no tokenizer\.pkl"):
        find_checkpoint(checkpoint_dir=storage / "d20", nanochat_base=storage / "nowhere")
    shutil.copytree(base / "tokenizer", storage / "tokenizer")  # <storage>/tokenizer shared by all tags
    ref = find_checkpoint(checkpoint_dir=storage / "d20", nanochat_base=storage / "nowhere")
    assert (ref.model_tag, ref.step, ref.source) == ("d20", 250, None)
    shutil.copy(base / "tokenizer" / "tokenizer.pkl", storage / "d20" / "tokenizer.pkl")  # beside wins
    assert find_checkpoint(checkpoint_dir=storage / "d20").tokenizer_path == storage / "d20" / "tokenizer.pkl"


def test_orig_mod_prefix_padded_vocab_and_bf16_embeddings(tmp_path):
    make_checkpoint(tmp_path, "G2", tag="d2", source="base", bf16_embeddings=True, orig_mod_prefix=True,
                    **SMALL)
    raw = torch.load(next((tmp_path / "base_checkpoints" / "d2").glob("model_*.pt")))
    assert all(k.startswith("_orig_mod.") for k in raw)
    assert raw["_orig_mod.transformer.wte.weight"].dtype == torch.bfloat16
    loaded, tok = open_checkpoint(find_checkpoint("base", nanochat_base=tmp_path))
    assert loaded.config.generation == "G2"
    assert loaded.config.padded_vocab_size % 64 == 0 and loaded.config.padded_vocab_size >= tok.vocab_size
    assert loaded.state_dict["transformer.wte.weight"].dtype == torch.float32


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(checkpoint_dir=tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no base checkpoints"):
        find_checkpoint("base", nanochat_base=tmp_path)


def test_unknown_tag_lists_the_tags_found(base):
    with pytest.raises(CheckpointError, match=r"unknown model tag 'd99'.*d12_small, d2"):
        find_checkpoint("sft", "d99", nanochat_base=base)


def test_missing_step_lists_the_steps_found(base):
    with pytest.raises(CheckpointError, match=r"step 7 not found.*\[100, 250\]"):
        find_checkpoint("sft", "d2", step=7, nanochat_base=base)


def test_unknown_source(base):
    with pytest.raises(CheckpointError, match="unknown source"):
        find_checkpoint("pretrain", nanochat_base=base)


def test_missing_tokenizer(base):
    (base / "tokenizer" / "tokenizer.pkl").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.pkl found"):
        find_checkpoint("sft", "d2", nanochat_base=base)


def test_vocab_size_mismatch(base):
    write_tokenizer(train_tokenizer(300), base / "tokenizer")
    with pytest.raises(CheckpointError, match="do not belong together"):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def test_corrupt_checkpoint(base):
    path = base / "chatsft_checkpoints" / "d2" / "model_000250.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def test_corrupt_tokenizer(base):
    (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps({"not": "a tokenizer"})[:5])
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def edit_state_dict(base, edit):
    path = base / "chatsft_checkpoints" / "d2" / "model_000250.pt"
    sd = torch.load(path)
    edit(sd)
    torch.save(sd, path)


def test_keys_that_fit_no_generation_are_named(base):
    edit_state_dict(base, lambda sd: (sd.pop("backout_lambda"), sd.__setitem__("mystery.weight", torch.zeros(3))))
    fits_no_generation = r"G4.*missing keys: \['backout_lambda'\].*unexpected keys: \['mystery\.weight'\]"
    with pytest.raises(CheckpointError, match=fits_no_generation):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def test_wrong_shapes_are_named(base):
    edit_state_dict(base, lambda sd: sd.__setitem__("transformer.h.0.attn.c_q.weight", torch.zeros(3, 64)))
    with pytest.raises(CheckpointError, match=r"wrong shapes.*c_q.weight \(3, 64\)"):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def test_engram_checkpoints_are_refused_by_name(base):
    edit_state_dict(base, lambda sd: sd.__setitem__("bigram_embed.embed.weight", torch.zeros(4, 64)))
    with pytest.raises(CheckpointError, match="engram"):
        open_checkpoint(find_checkpoint("sft", "d2", nanochat_base=base))


def test_demo_checkpoint_is_deterministic(tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=5)
    b = make_checkpoint(tmp_path / "b", seed=5)
    for name in ("model_000000.pt", "meta_000000.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    tokenizers = [(tmp_path / d / "tokenizer" / "tokenizer.pkl").read_bytes() for d in "ab"]
    assert tokenizers[0] == tokenizers[1]
    loaded, _ = open_checkpoint(find_checkpoint("sft", nanochat_base=tmp_path / "a"))
    assert (loaded.ref.model_tag, loaded.config.generation) == ("demo", "G4")


def test_ambiguous_constants_are_overridable(base):
    from core.config import parse_overrides
    from core.gpt import build_gpt

    ref = find_checkpoint("sft", "d2", nanochat_base=base)
    overrides = parse_overrides(["softcap=20", "rope_bf16=true"])
    assert overrides == {"softcap": 20.0, "rope_bf16": True}
    default = build_gpt(*(lambda c: (c.config, c.state_dict))(open_checkpoint(ref)[0]))
    changed = open_checkpoint(ref, **overrides)[0]
    assert changed.config.softcap == 20.0
    other = build_gpt(changed.config, changed.state_dict)
    assert not torch.allclose(default.full_logits([1, 2, 3]), other.full_logits([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown config override"):
        open_checkpoint(ref, softcapp=20.0)
    with pytest.raises(ValueError, match="bad override"):
        parse_overrides(["nonsense"])
