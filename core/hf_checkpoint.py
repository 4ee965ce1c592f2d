"""
A Hugging Face transformers NanoChat folder (what NanoChatForCausalLM.save_pretrained writes) read as a checkpoint.
transformers' NanoChat is nanochat's G0 (core/config.py), except where config.json gives what G0 fixes: rope_theta
(tables in fp32), rms_norm_eps and final_logit_softcapping. Anything else the core cannot represent is refused, with
the file and field named.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.checkpoint import CheckpointError
from core.config import ModelConfig, build_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"
DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the dtypes read (into fp32)


def is_transformers_folder(directory: Path) -> bool:
    """The detection rule: a config.json and no nanochat model_<step>.pt beside it."""
    return (directory / CONFIG_FILE).is_file() and not any(directory.glob("model_*.pt"))


def read_hf_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return hf


def model_config(directory: Path, hf: dict, **overrides) -> ModelConfig:
    """config.json as the core's ModelConfig (G0 with config.json's constants), or what it cannot represent."""
    path = directory / CONFIG_FILE

    def field(name: str, default=None, kind=int):
        value = hf.get(name)
        if value is None:  # absent or null: NanoChatConfig's default, where it has one
            if default is None:
                raise CheckpointError(f"{path}: {name} is missing")
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: {name} is {value!r}, not a number") from None

    def refuse(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {name} is {hf.get(name)!r}; {why}")

    if hf.get("model_type") != "nanochat":
        raise refuse("model_type", "only transformers' NanoChat (model_type nanochat) is nanochat's architecture")
    if hf.get("hidden_act", "relu2") != "relu2":
        raise refuse("hidden_act", "nanochat's MLP is relu2")
    if hf.get("attention_bias", False):
        raise refuse("attention_bias", "nanochat has no biases")
    C, H, L, V = field("hidden_size"), field("num_attention_heads"), field("num_hidden_layers"), field("vocab_size")
    Hkv = field("num_key_value_heads", H)
    if field("intermediate_size") != 4 * C:
        raise refuse("intermediate_size", f"nanochat's MLP is 4 x hidden_size ({4 * C})")
    if C % H:
        raise refuse("num_attention_heads", f"nanochat's heads split hidden_size {C} evenly")
    if field("head_dim", C // H) != C // H:
        raise refuse("head_dim", f"nanochat's heads are hidden_size / num_attention_heads ({C // H}) wide")
    if H % Hkv:
        raise refuse("num_key_value_heads", f"num_attention_heads {H} must be a multiple of it")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta")}  # or legacy
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise refuse("rope_parameters", "only the default rotary embedding (no scaling) is nanochat's")
    try:
        rope_base = float(rope["rope_theta"])
    except (KeyError, TypeError, ValueError):
        raise refuse("rope_parameters", "it gives no rope_theta") from None
    softcapped = hf.get("final_logit_softcapping", 15.0) is not None  # absent: NanoChatConfig's 15; null: none
    constants = dict(rope_base=rope_base, rope_bf16=False,  # transformers computes cos/sin in fp32
                     norm_eps=field("rms_norm_eps", 1e-6, float),
                     softcap=field("final_logit_softcapping", 15.0, float) if softcapped else None)
    sizes = dict(sequence_len=field("max_position_embeddings"), vocab_size=V, n_layer=L, n_head=H, n_kv_head=Hkv,
                 n_embd=C)
    return build_config("G0", sizes, padded_vocab_size=V, **{**constants, **overrides})


def tensor_plan(cfg: ModelConfig, tied: bool) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """transformers' name -> (the core's name, shape, the config.json fields that make the shape)."""
    C, D, H, Hkv, V, L = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, cfg.vocab_size, cfg.n_layer
    hidden, mlp = f"hidden_size {C}", f"intermediate_size {4 * C}"
    plan = {"model.embed_tokens.weight": ("transformer.wte.weight", (V, C), f"vocab_size {V}, {hidden}")}
    for i in range(L):
        hf, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        plan[hf + "self_attn.q_proj.weight"] = (ours + "attn.c_q.weight", (H * D, C),
                                                f"num_attention_heads {H} x head_dim {D}, {hidden}")
        for kv in "kv":
            plan[hf + f"self_attn.{kv}_proj.weight"] = (ours + f"attn.c_{kv}.weight", (Hkv * D, C),
                                                        f"num_key_value_heads {Hkv} x head_dim {D}, {hidden}")
        plan[hf + "self_attn.o_proj.weight"] = (ours + "attn.c_proj.weight", (C, H * D),
                                                f"{hidden}, num_attention_heads {H} x head_dim {D}")
        plan[hf + "mlp.fc1.weight"] = (ours + "mlp.c_fc.weight", (4 * C, C), f"{mlp}, {hidden}")
        plan[hf + "mlp.fc2.weight"] = (ours + "mlp.c_proj.weight", (C, 4 * C), f"{hidden}, {mlp}")
    if not tied:
        plan["lm_head.weight"] = ("lm_head.weight", (V, C), f"vocab_size {V}, {hidden}")
    return plan


def weight_map(directory: Path) -> dict[str, Path]:
    """Each tensor's file: the index's weight_map for a sharded folder, else model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the weight_map of {index}: {e}") from e
        files = {name: directory / shard for name, shard in names.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index} names the shard {shard.name}, which is missing")
        return files
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {directory} (only safetensors weights are read)")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_state_dict(directory: Path, cfg: ModelConfig, tied: bool) -> dict:
    """The core's state dict in fp32, read one tensor at a time, every name and shape checked against config.json."""
    from safetensors import safe_open

    plan, files = tensor_plan(cfg, tied), weight_map(directory)
    where = directory / (INDEX_FILE if (directory / INDEX_FILE).is_file() else WEIGHTS_FILE)
    extra = set(files) - set(plan) - ({"lm_head.weight"} if tied else set())
    if extra:
        raise CheckpointError(f"{where}: unexpected tensors (nanochat's architecture has no place for them): "
                              f"{sorted(extra)[:8]}")
    missing = [name for name in plan if name not in files]
    if missing:
        raise CheckpointError(f"{where}: missing tensors that config.json's sizes call for: {missing[:8]}")
    state_dict = {}
    for shard in sorted(set(files.values())):
        with safe_open(shard, framework="pt") as f:
            held = set(f.keys())
            for name in [n for n, s in files.items() if s == shard]:
                if name not in held:
                    raise CheckpointError(f"{shard}: missing tensor {name}, which {INDEX_FILE} places in it")
                info = f.get_slice(name)
                if info.get_dtype() not in DTYPES:
                    raise CheckpointError(f"{shard}: {name} is {info.get_dtype()}; only {', '.join(DTYPES)} are read")
                if name not in plan:  # an lm_head saved although tied: transformers ties it to the embedding
                    continue
                ours, shape, fields = plan[name]
                if tuple(info.get_shape()) != shape:
                    raise CheckpointError(f"{shard}: {name} has shape {tuple(info.get_shape())}, but "
                                          f"{CONFIG_FILE}'s {fields} make it {shape}")
                # one tensor at a time, so the weights are held once (an fp32 file's stay views of its mapped pages)
                state_dict[ours] = f.get_tensor(name).float()
    if tied:
        state_dict["lm_head.weight"] = state_dict["transformer.wte.weight"]
    return state_dict


def read_folder(directory: Path, **overrides) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, the core's fp32 state dict, config.json) of a transformers NanoChat folder."""
    hf = read_hf_config(directory)
    cfg = model_config(directory, hf, **overrides)
    return cfg, read_state_dict(directory, cfg, bool(hf.get("tie_word_embeddings", False))), hf
