"""
A transformers NanoChat folder read by the core (core/hf_checkpoint.py, core/tokenizer_json.py): the logits against
transformers' own forward pass on the same folder, sharded fp32, bf16 and tied without a softcap; a mapping or
constant mistake failing that same comparison; the tokenizer against nanochat's; and each folder the core refuses,
with the file and the field named.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from core import hf_checkpoint
from core.checkpoint import CheckpointError, find_checkpoint, open_checkpoint
from core.config import NORM_EPS
from core.gpt import TorchRunner, build_gpt
from core.tokenizer import Tokenizer
from core.tokenizer_json import read_encoding
from tests.support.hf_models import nanochat_model, oracle_encoding, save_folder

TOL = 1e-4
MESSAGES = [{"role": "user", "content": "Why is the sky blue? Explain it to a child, in 3 short sentences."}]


@pytest.fixture(scope="module")
def encoding():
    return oracle_encoding()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, encoding) -> dict:
    """Three folders as transformers saves them: sharded fp32 (GQA), bf16 in one file, and tied embeddings without
    a softcap (4 kv heads, config.json's legacy rope_theta)."""
    root = tmp_path_factory.mktemp("hf")
    model = nanochat_model(encoding, seed=1)
    out = {"sharded": save_folder(model, encoding, root / "sharded", max_shard_size="300KB"),
           "bf16": save_folder(model.to(torch.bfloat16), encoding, root / "bf16")}
    tied = nanochat_model(encoding, seed=2, tie_word_embeddings=True, final_logit_softcapping=None,
                          num_key_value_heads=4)
    out["tied"] = save_folder(tied, encoding, root / "tied")
    config = json.loads((out["tied"] / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # as configs before rope_parameters say it
    (out["tied"] / "config.json").write_text(json.dumps(config))
    return out


def transformers_logits(folder, ids) -> torch.Tensor:
    """transformers' own reading of the folder (fp32), its logits at every position."""
    from transformers import NanoChatForCausalLM

    model = NanoChatForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def core_diff(folder, ids, **overrides) -> float:
    loaded, _ = open_checkpoint(find_checkpoint(checkpoint_dir=folder), **overrides)
    ours = build_gpt(loaded.config, loaded.state_dict).full_logits(ids)
    return float((ours - transformers_logits(folder, ids)).abs().max())


def prompt(encoding) -> list[int]:
    return Tokenizer(encoding).render_for_completion(MESSAGES)


@pytest.mark.parametrize("variant", ["sharded", "bf16", "tied"])
def test_logits_match_transformers(folders, encoding, variant):
    folder, ids = folders[variant], prompt(encoding)
    ref = find_checkpoint(checkpoint_dir=folder)
    assert (ref.format, ref.step, ref.tokenizer_path.name, ref.checkpoint_path) == \
        ("transformers", None, "tokenizer.json", folder)
    loaded, _ = open_checkpoint(ref)
    cfg = loaded.config
    assert (cfg.generation, cfg.rope_bf16, cfg.rope_base, cfg.norm_eps, cfg.sequence_len) == \
        ("G0", False, 50000.0, 1e-3, 256)
    assert (cfg.softcap, cfg.n_kv_head) == ((None, 4) if variant == "tied" else (15.0, 2))
    assert all(t.dtype == torch.float32 for t in loaded.state_dict.values())
    if variant == "sharded":
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    if variant == "tied":
        assert loaded.state_dict["lm_head.weight"] is loaded.state_dict["transformer.wte.weight"]
    diff = core_diff(folder, ids)
    assert diff < TOL, f"{variant}: core vs transformers max |logit diff| {diff:.2e}"


def test_cached_decode_matches_transformers(folders, encoding):
    """The serving path (prefill into the KV cache, then one token at a time) against transformers' full forward."""
    folder, ids = folders["sharded"], prompt(encoding)
    loaded, _ = open_checkpoint(find_checkpoint(checkpoint_dir=folder))
    runner = TorchRunner(build_gpt(loaded.config, loaded.state_dict), 2, 128)
    theirs = transformers_logits(folder, ids).numpy()
    n = len(ids) - 8
    got = [runner.forward(np.array([ids[:n]]), np.array([0]), np.array([1]))[0]]
    got += [runner.forward(np.array([[t]]), np.array([p]), np.array([1]))[0] for p, t in enumerate(ids[n:], n)]
    assert np.abs(np.stack(got) - theirs[n - 1:]).max() < TOL


def test_the_bf16_folder_holds_the_fp32_weights_rounded(folders):
    fp32 = open_checkpoint(find_checkpoint(checkpoint_dir=folders["sharded"]))[0].state_dict
    bf16 = open_checkpoint(find_checkpoint(checkpoint_dir=folders["bf16"]))[0].state_dict
    assert fp32.keys() == bf16.keys()
    assert all(torch.equal(bf16[k], v.bfloat16().float()) for k, v in fp32.items())


@pytest.mark.parametrize("mistake", ["q and k swapped", "G0's eps", "G0's bf16 rotary", "G0's rotary base",
                                     "G0's softcap"])
def test_a_mapping_or_constant_mistake_fails_the_comparison(folders, encoding, monkeypatch, mistake):
    """The comparison above is sharp enough: each of these mistakes moves the logits by far more than TOL."""
    overrides = {"G0's eps": dict(norm_eps=NORM_EPS), "G0's bf16 rotary": dict(rope_bf16=True),
                 "G0's rotary base": dict(rope_base=10000.0), "G0's softcap": dict(softcap=15.0)}.get(mistake, {})
    if mistake == "q and k swapped":
        plan = hf_checkpoint.tensor_plan

        def swapped(cfg, tied):
            out = plan(cfg, tied)
            q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
            out[q], out[k] = out[k], out[q]
            return out

        monkeypatch.setattr(hf_checkpoint, "tensor_plan", swapped)
    diff = core_diff(folders["tied"], prompt(encoding), **overrides)  # 4 kv heads: q and k have one shape
    assert diff > 10 * TOL, f"{mistake}: max |logit diff| only {diff:.2e}"


TEXTS = ["Hello world!", "café ☕ naïve 日本語 🤖 Ünïcödé", "1234567890 3.14159 1,000,000 2+2=4",
         "  leading   spaces\t\ttabs\n\n\nnewlines\r\n  ", "", "x" * 300, "don't I'LL we're they've",
         "def f(x):\n    return x ** 2  # comment", "<|bos|> and <|user_start|> as plain text"]


def test_tokenizer_json_reads_back_nanochats_encoding(folders, encoding):
    from tokenizers import Tokenizer as HFTokenizer

    path = folders["sharded"] / "tokenizer.json"
    enc = read_encoding(path)
    assert enc._mergeable_ranks == encoding._mergeable_ranks and enc._pat_str == encoding._pat_str
    ours, theirs = Tokenizer.load(path), Tokenizer(encoding)
    assert ours.special_ids == theirs.special_ids and ours.vocab_size == theirs.vocab_size
    hf = HFTokenizer.from_file(str(path))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        if "<|" not in text:  # Hugging Face splits added tokens out of text; nanochat never does
            assert hf.encode(text, add_special_tokens=False).ids == theirs.encode(text), text
    assert ours.render_for_completion(MESSAGES) == theirs.render_for_completion(MESSAGES)


def edited_copy(folder, tmp_path, file: str, edit):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    data = json.loads((copy / file).read_text())
    edit(data)
    (copy / file).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("field, value", [("model_type", "llama"), ("hidden_act", "gelu"), ("attention_bias", True),
                                          ("intermediate_size", 128), ("head_dim", 32),
                                          ("rope_parameters", {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 50000.0})])
def test_what_the_core_cannot_represent_is_refused_by_field(folders, tmp_path, field, value):
    copy = edited_copy(folders["sharded"], tmp_path, "config.json", lambda c: c.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(copy / 'config.json'))}: {field} is"):
        open_checkpoint(find_checkpoint(checkpoint_dir=copy))


def test_a_shape_that_disagrees_with_config_json(folders, tmp_path):
    copy = edited_copy(folders["sharded"], tmp_path, "config.json", lambda c: c.__setitem__("num_key_value_heads", 4))
    shape = (r"model-\d+-of-\d+\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\), "
             r"but config\.json's num_key_value_heads 4 x head_dim 16, hidden_size 64 make it \(64, 64\)")
    with pytest.raises(CheckpointError, match=shape):
        open_checkpoint(find_checkpoint(checkpoint_dir=copy))


def test_missing_unexpected_and_misplaced_tensors(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "one"
    shutil.copytree(folders["bf16"], copy)
    tensors = load_file(copy / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.fc2.weight"}, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensors .*model\.layers\.1\.mlp\.fc2"):
        open_checkpoint(find_checkpoint(checkpoint_dir=copy))
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensors .*q_norm\.weight"):
        open_checkpoint(find_checkpoint(checkpoint_dir=copy))

    index = "model.safetensors.index.json"
    weight_map = json.loads((folders["sharded"] / index).read_text())["weight_map"]
    name, shard = next((n, s) for n, s in weight_map.items() if s != weight_map["model.embed_tokens.weight"])
    moved = edited_copy(folders["sharded"], tmp_path / "moved", index,
                        lambda i: i["weight_map"].__setitem__(name, weight_map["model.embed_tokens.weight"]))
    with pytest.raises(CheckpointError, match=rf"missing tensor {name}, which {index} places in it"):
        open_checkpoint(find_checkpoint(checkpoint_dir=moved))
    lost = tmp_path / "lost"
    shutil.copytree(folders["sharded"], lost)
    (lost / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{index} names the shard {shard}, which is missing"):
        open_checkpoint(find_checkpoint(checkpoint_dir=lost))


def test_a_tokenizer_of_another_size(tmp_path, encoding):
    folder = save_folder(nanochat_model(encoding, vocab_size=encoding.n_vocab + 64), encoding, tmp_path / "padded")
    tokenizer, config = (re.escape(str(folder / f)) for f in ("tokenizer.json", "config.json"))
    with pytest.raises(CheckpointError, match=rf"tokenizer {tokenizer} has 4096 tokens but the checkpoint's "
                                              rf"vocab_size \({config}\) is 4160"):
        open_checkpoint(find_checkpoint(checkpoint_dir=folder))


@pytest.mark.parametrize("field, edit", [
    ("model.type", lambda t: t["model"].__setitem__("type", "WordPiece")),
    ("added_tokens", lambda t: t.__setitem__("added_tokens", t["added_tokens"][:4])),
    ("normalizer", lambda t: t.__setitem__("normalizer", {"type": "NFC"})),
    ("model.merges", lambda t: t["model"]["merges"].reverse()),
])
def test_a_tokenizer_json_that_is_not_nanochats_is_refused(folders, tmp_path, field, edit):
    copy = edited_copy(folders["sharded"], tmp_path, "tokenizer.json", edit)
    with pytest.raises(CheckpointError, match=rf"tokenizer {re.escape(str(copy / 'tokenizer.json'))}: {field}"):
        open_checkpoint(find_checkpoint(checkpoint_dir=copy))


def test_detection_and_what_a_transformers_folder_lacks(folders, tmp_path):
    with pytest.raises(CheckpointError, match="has no steps"):
        find_checkpoint(checkpoint_dir=folders["sharded"], step=5)
    copy = tmp_path / "no_tokenizer"
    shutil.copytree(folders["sharded"], copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json in the transformers folder"):
        find_checkpoint(checkpoint_dir=copy)
    ref = find_checkpoint(checkpoint_dir=folders["sharded"])
    with pytest.raises(CheckpointError, match="transformers folder: it has no model_path"):
        _ = ref.model_path
    assert hf_checkpoint.is_transformers_folder(folders["sharded"])
    (copy / "model_000001.pt").touch()  # a model_<step>.pt beside config.json: nanochat's layout
    assert not hf_checkpoint.is_transformers_folder(copy)
