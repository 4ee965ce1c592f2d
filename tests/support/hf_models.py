"""Hugging Face transformers NanoChat folders made by transformers itself (NanoChatForCausalLM.save_pretrained, and
its tiktoken converter for the tokenizer), from a nanochat tokenizer: what `make export CHECKPOINT_DIR=` takes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# small, GQA (4 query heads on 2 kv heads), constants other than G0's own (eps, rope base) so that each is read
SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-3, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 50000.0})


def nanochat_model(encoding, seed: int = 0, **config):
    """A random NanoChatForCausalLM (fp32, eval) over the encoding's vocabulary, its special ids in the config.
    Weights are drawn at 1/sqrt(fan-in) (transformers' init is 0.02), so logits spread as a trained model's do
    and greedy choices are never near-ties."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    specials = encoding._special_tokens
    cfg = NanoChatConfig(**{**SMALL, "vocab_size": encoding.n_vocab, "bos_token_id": specials["<|bos|>"],
                            "eos_token_id": specials["<|assistant_end|>"], "pad_token_id": specials["<|bos|>"],
                            **config})
    torch.manual_seed(seed)
    model = NanoChatForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)
    return model


def save_folder(model, encoding, out: Path, **save) -> Path:
    """model.save_pretrained(out, **save) (max_shard_size=, or a model cast to bf16) and the tokenizer as
    transformers converts nanochat's: tokenizer.json, and a tokenizer_config.json with a chat template."""
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    model.save_pretrained(out, **save)
    convert_tiktoken_to_fast(encoding, str(out))
    template = ("<|bos|>{% for m in messages %}{% if m['role'] == 'user' %}<|user_start|>{{ m['content'] }}"
                "<|user_end|>{% else %}<|assistant_start|>{{ m['content'] }}<|assistant_end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant_start|>{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "chat_template": template}))
    return out


def oracle_encoding():
    """nanochat's tokenizer as the head oracle trained it (tests/support/oracles.py), unpickled."""
    import pickle

    from tests.support.oracles import oracle_tokenizer

    with open(oracle_tokenizer(), "rb") as f:
        return pickle.load(f)


def write_oracle_model(out: Path, seed: int = 0, **save) -> Path:
    """The small model over the oracle tokenizer, saved into `out`."""
    encoding = oracle_encoding()
    return save_folder(nanochat_model(encoding, seed), encoding, out, **save)
