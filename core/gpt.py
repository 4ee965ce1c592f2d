"""
nanochat's GPT forward pass, written for serving and export rather than training: one function for prefill and
decode that reads the KV cache as given, never copied whole, and returns only the new positions' K/V for the caller
to store. Every generation's math comes from ModelConfig, and it is plain tensor math so torch.onnx.export can trace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import SMEAR_CHANNELS, ModelConfig
from core.device_sampling import BatchSampling, Drawn, draw, new_generator
from core.last_tokens import LastTokens


def norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # F.rms_norm(x, (C,)) with eps=None, decomposed so exporters and TensorRT's parser see basic ops
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (10*S, D/2), computed as nanochat does (fp32, optionally rounded to bf16)."""
    D = cfg.head_dim
    # on the CPU even while build_gpt builds the module on the meta device: these are computed, not loaded
    channel_range = torch.arange(0, D, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / (cfg.rope_base ** (channel_range / D))
    t = torch.arange(cfg.rope_len, dtype=torch.float32, device="cpu")
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    if cfg.rope_bf16:
        cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]  # nanochat's: halves split, rotation by -theta
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        C, D = cfg.n_embd, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, D
        self.c_q = nn.Linear(C, cfg.n_head * D, bias=False)
        self.c_k = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.c_v = nn.Linear(C, cfg.n_kv_head * D, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.ve_gate = nn.Linear(cfg.ve_gate_channels, cfg.n_kv_head, bias=False) if cfg.has_ve(layer) else None
        self.ve_gate_channels, self.ve_gate_scale = cfg.ve_gate_channels, cfg.ve_gate_scale
        self.qk_scale, self.eps = cfg.qk_scale, cfg.norm_eps

    def forward(self, h, ve, cos, sin, k_past, v_past, mask):
        """h (B,T,C) normed input; k_past/v_past (B,Hkv,Lc,D); mask (B,1,T,Lc+T) -> y, k_new, v_new."""
        B, T, _ = h.shape
        q = self.c_q(h).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(h).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(h).view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:
            # value embedding, mixed per kv head by a gate over the first channels of the input
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(h[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q, self.eps), norm(k, self.eps)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        # attention over cached + new keys; kv heads repeated for GQA (query head h uses kv head h // G)
        keys = torch.cat([k_past, k.transpose(1, 2)], dim=2)  # (B, Hkv, Lc+T, D)
        values = torch.cat([v_past, v.transpose(1, 2)], dim=2)
        G = self.n_head // self.n_kv_head
        if G > 1:
            S = keys.shape[2]
            keys = keys[:, :, None].expand(B, self.n_kv_head, G, S, self.head_dim).reshape(B, self.n_head, S, -1)
            values = values[:, :, None].expand(B, self.n_kv_head, G, S, self.head_dim).reshape(B, self.n_head, S, -1)
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * (1.0 / self.head_dim**0.5)
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)


@dataclass
class StepOutput:
    logits: torch.Tensor  # (B, V) last position, or (B, T, V) with all_logits
    new_k: list[torch.Tensor]  # per layer (T, B, Hkv, D), ready to store at the rows' positions
    new_v: list[torch.Tensor]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        Vp, C = cfg.padded_vocab_size, cfg.n_embd
        self.transformer = nn.ModuleDict(
            dict(wte=nn.Embedding(Vp, C), h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]))
        )
        self.lm_head = nn.Linear(C, Vp, bias=False)
        if cfg.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        ve_dim = cfg.n_kv_head * cfg.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(Vp, ve_dim) for i in range(cfg.n_layer) if cfg.has_ve(i)}
        )
        if cfg.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        cos, sin = rotary_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.windows = cfg.window_sizes()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        prev_ids: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> StepOutput:
        """ids (B, T) starting at positions (B,) in cache rows slots (B,); the last position's logits (or every
        position's) and the K/V of the T new positions. The cache is read as given:

            k_cache[i], v_cache[i]: (Lc, max_slots, n_kv_head, head_dim)  sequence axis first: the first Lc
                                                                          positions are a contiguous slice
            prev_ids: (B,)  G4's smear: the token before each row's first new one (any value at 0)

        As in nanochat: rotary before QK norm, RMSNorm without weights, relu^2 MLP, no biases, untied wte/lm_head."""
        cfg, eps = self.config, self.config.norm_eps
        B, T = input_ids.shape
        Lc = k_cache[0].shape[0]
        q_pos = positions[:, None] + torch.arange(T, device=input_ids.device)[None, :]  # (B, T)

        # masks: a key is visible if it is cached for this row or new, causal, and inside the window
        past_pos = torch.arange(Lc, device=input_ids.device)
        key_pos = torch.cat([past_pos[None, :].expand(B, Lc), q_pos], dim=1)  # (B, Lc+T)
        key_valid = torch.cat([past_pos[None, :] < positions[:, None], torch.ones_like(q_pos, dtype=torch.bool)], 1)
        dist = q_pos[:, :, None] - key_pos[:, None, :]  # (B, T, Lc+T)
        visible = key_valid[:, None, :] & (dist >= 0)
        masks = {w: (visible if w is None else visible & (dist <= w))[:, None] for w in set(self.windows)}

        cos, sin = self.cos[q_pos][:, :, None, :], self.sin[q_pos][:, :, None, :]  # (B, T, 1, D/2)

        x = norm(self.transformer.wte(input_ids), eps)
        if cfg.smear:
            # smear the previous token's embedding into each position p >= 1; before the first new token it is
            # the embedding of prev_ids (a lookup, so a row continues exactly from any position of its cache)
            prev = norm(self.transformer.wte(prev_ids), eps)[:, None, :]
            x_prev = torch.cat([prev, x[:, :-1]], dim=1)
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
            x = x + torch.where((q_pos >= 1)[..., None], gate * x_prev, torch.zeros_like(x))
        x0 = x

        new_k, new_v = [], []
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if cfg.has_ve(i) else None
            k_past = k_cache[i].index_select(1, slots).permute(1, 2, 0, 3)  # (B, Hkv, Lc, D)
            v_past = v_cache[i].index_select(1, slots).permute(1, 2, 0, 3)
            y, k, v = block.attn(norm(x, eps), ve, cos, sin, k_past, v_past, masks[self.windows[i]])
            x = x + y
            x = x + block.mlp(norm(x, eps))
            new_k.append(k.transpose(0, 1))  # (T, B, Hkv, D)
            new_v.append(v.transpose(0, 1))
            if cfg.backout and i == cfg.backout_layer:
                x_backout = x
        if x_backout is not None:
            x = x - self.backout_lambda * x_backout
        if not all_logits:
            x = x[:, -1]
        logits = self.lm_head(norm(x, eps))[..., : cfg.vocab_size].float()
        if cfg.softcap is not None:
            logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        return StepOutput(logits, new_k, new_v)

    def empty_cache(self, max_slots: int, max_seq: int) -> tuple[list, list]:
        """A KV cache on the model's device, in its dtype (bf16 on a GPU, as nanochat's)."""
        cfg, like = self.config, dict(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        shape = (max_seq, max_slots, cfg.n_kv_head, cfg.head_dim)
        k = [torch.zeros(shape, **like) for _ in range(cfg.n_layer)]
        v = [torch.zeros(shape, **like) for _ in range(cfg.n_layer)]
        return k, v

    @torch.inference_mode()
    def full_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence, with no cache (nanochat's model.forward(ids))."""
        k, v = self.empty_cache(1, 0)
        zero = torch.zeros(1, dtype=torch.long)
        return self.forward(torch.tensor([ids]), zero, zero, k, v, zero, all_logits=True).logits[0]


def build_gpt(cfg: ModelConfig, state_dict: dict) -> GPT:
    """The model on the state dict's own tensors: built on the meta device and assigned, so no weight is
    allocated, initialised or copied (the export of a d20 holds its weights once, not twice)."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


class TorchRunner:
    """The PyTorch model core behind the `Runner` interface: it owns a KV cache (on the model's device) and writes
    new K/V."""

    def __init__(self, model: GPT, max_slots: int, max_seq: int):
        if max_seq > model.config.rope_len:
            raise ValueError(f"max_seq {max_seq} exceeds the rotary table ({model.config.rope_len} positions)")
        self.model, self.max_slots, self.max_seq = model, max_slots, max_seq
        self.k, self.v = model.empty_cache(max_slots, max_seq)
        self.prev = LastTokens(max_slots) if model.config.smear else None
        self.generator = new_generator(self.k[0].device)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return self._logits(input_ids, positions, slots).cpu().numpy()

    def step(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, sampling: BatchSampling) -> Drawn:
        return draw(self._logits(input_ids, positions, slots), sampling, self.generator)

    @torch.inference_mode()
    def _logits(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        dev = self.k[0].device
        ids, pos, sl = (torch.from_numpy(np.asarray(a, dtype=np.int64)).to(dev) for a in (input_ids, positions, slots))
        T = ids.shape[1]
        if int(pos.max()) + T > self.max_seq:
            raise ValueError(f"positions {pos.tolist()} + {T} tokens exceed the cache of {self.max_seq}")
        Lc = int(pos.max())
        prev = None if self.prev is None else torch.from_numpy(self.prev.before(slots)).to(dev)
        out = self.model(ids, pos, sl, [k[:Lc] for k in self.k], [v[:Lc] for v in self.v], prev)
        rows = (pos[:, None] + torch.arange(T, device=dev)[None, :]).T  # (T, B) cache positions
        cols = sl[None, :].expand(T, -1)
        for cache, new in zip(self.k + self.v, out.new_k + out.new_v, strict=True):
            cache[rows, cols] = new
        if self.prev is not None:
            self.prev.fed(slots, input_ids)
        return out.logits
