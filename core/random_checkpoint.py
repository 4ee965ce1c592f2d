"""
Small nanochat checkpoints the project makes itself, in nanochat's exact on-disk format: random weights of any
generation G0..G4, deterministic from a seed, and a tokenizer rustbpe trains on core/data/demo_corpus.txt. The
default is the model `make demo` serves (a G4 "demo" among the sft checkpoints); `--help` shows a d20's flags.

    python -m core.random_checkpoint --out /tmp/nanochat-demo
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import torch

from core.checkpoint import SOURCES, TOKENIZER_FILE, expected_shapes
from core.config import build_config
from core.tokenizer import SPECIAL_TOKENS

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
CORPUS = Path(__file__).parent / "data" / "demo_corpus.txt"


def train_tokenizer(vocab_size: int = 512):
    """A tiktoken Encoding trained by rustbpe the way nanochat's tok_train builds it. The demo corpus runs out of
    merges long before a real vocabulary's size (65,536 for a d20): the rest are filler tokens no text encodes to,
    so a model of real shape can be made here for measuring memory and speed."""
    import rustbpe
    import tiktoken

    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(paragraphs), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    for i in range(len(ranks), vocab_size - len(SPECIAL_TOKENS)):
        ranks[b"\xff\xfe" + i.to_bytes(4, "big")] = i  # 0xff never occurs in UTF-8 text: no merge reaches these
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks,
                             special_tokens=specials)


def write_tokenizer(enc, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / TOKENIZER_FILE, "wb") as f:
        pickle.dump(enc, f)
    special_ids = set(enc._special_tokens.values())
    lengths = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    torch.save(torch.tensor(lengths, dtype=torch.int32), directory / "token_bytes.pt")  # 0 for specials, as nanochat


def model_config_for(generation: str, depth: int, n_embd: int, n_head: int, n_kv_head: int,
                     sequence_len: int, vocab_size: int, window_pattern: str) -> dict:
    """The meta json's model_config as that generation's nanochat wrote it (G0 had no window_pattern)."""
    mc = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
              n_kv_head=n_kv_head, n_embd=n_embd)
    if generation != "G0":
        mc["window_pattern"] = window_pattern
    return mc


def random_state_dict(generation: str, model_config: dict, padded_vocab: int, seed: int) -> dict:
    """Random weights of the right keys and shapes; scalars in ranges trained models show."""
    cfg = build_config(generation, model_config, padded_vocab_size=padded_vocab)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        if name == "resid_lambdas":
            t = 1.0 + 0.1 * torch.rand(shape, generator=gen)
        elif name == "x0_lambdas":
            t = 0.2 * torch.rand(shape, generator=gen) - 0.1
        elif name in ("smear_lambda", "backout_lambda"):
            t = 0.2 + 0.4 * torch.rand(shape, generator=gen)
        else:
            fan_in = shape[-1]
            std = 1.0 if "wte" in name or "value_embeds" in name else fan_in**-0.5
            t = std * torch.randn(shape, generator=gen)
        sd[name] = t
    return sd


def make_checkpoint(
    base: str | Path,
    generation: str = "G4",
    tag: str = "demo",
    source: str = "sft",
    step: int = 0,
    depth: int = 4,
    n_embd: int = 128,
    n_head: int = 2,
    n_kv_head: int | None = None,
    sequence_len: int = 512,
    window_pattern: str = "SSSL",
    vocab_size: int = 512,
    seed: int = 0,
    pad_vocab: bool = True,
    bf16_embeddings: bool = False,
    orig_mod_prefix: bool = False,
) -> Path:
    """Write a checkpoint (and the tokenizer) under `base`; returns the checkpoint directory."""
    enc = tokenizer_for(base, vocab_size)
    V = enc.n_vocab  # rustbpe may stop early on a small corpus: always read the size back
    padded = -(-V // 64) * 64 if pad_vocab else V
    mc = model_config_for(generation, depth, n_embd, n_head, n_kv_head or n_head, sequence_len, V, window_pattern)
    sd = random_state_dict(generation, mc, padded, seed)
    if bf16_embeddings:  # what a CUDA-trained checkpoint stores
        sd = {k: v.bfloat16() if k.startswith(("transformer.wte", "value_embeds")) else v for k, v in sd.items()}
    if orig_mod_prefix:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    user = dict(depth=depth, seed=seed, generation=generation, made_by="core.random_checkpoint")
    return save_checkpoint(base, source, tag, step, mc, sd, user)


def tokenizer_for(base: Path, vocab_size: int = 512):
    """The tokenizer under base/tokenizer, trained and written there first if there is none."""
    tok_dir = Path(base) / "tokenizer"
    if (tok_dir / TOKENIZER_FILE).is_file():
        with open(tok_dir / TOKENIZER_FILE, "rb") as f:
            return pickle.load(f)
    enc = train_tokenizer(vocab_size)
    write_tokenizer(enc, tok_dir)
    return enc


def save_checkpoint(base: str | Path, source: str, tag: str, step: int, model_config: dict, state_dict: dict,
                    user_config: dict) -> Path:
    """model_<step>.pt and meta_<step>.json as nanochat's save_checkpoint writes them; returns the folder."""
    directory = Path(base) / SOURCES[source] / tag
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / f"model_{step:06d}.pt")
    meta = dict(step=step, val_bpb=None, model_config=model_config, user_config=user_config)
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description="Write a small nanochat checkpoint (random weights) in nanochat's format.",
                                epilog="a d20 of the current shape (1.4 B parameters): --tag d20 --depth 20 "
                                       "--n-embd 1280 --n-head 10 --sequence-len 2048 --vocab-size 65536")
    p.add_argument("--out", required=True, help="nanochat base directory to write into")
    p.add_argument("--generation", default="G4", choices=["G0", "G1", "G2", "G3", "G4"])
    p.add_argument("--tag", default="demo")
    p.add_argument("--source", default="sft", choices=sorted(SOURCES))
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    shape = ("n_embd", "n_head", "sequence_len", "vocab_size")  # make_checkpoint's defaults unless given
    for name in shape:
        p.add_argument("--" + name.replace("_", "-"), type=int)
    a = p.parse_args()
    given = {k: getattr(a, k) for k in shape if getattr(a, k) is not None}
    d = make_checkpoint(a.out, a.generation, a.tag, a.source, depth=a.depth, seed=a.seed, **given)
    print(json.dumps({"event": "demo_checkpoint", "path": str(d), "generation": a.generation}))


if __name__ == "__main__":
    main()
