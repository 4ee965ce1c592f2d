"""
`make demo`'s model, trained for about a minute on CPU so that the first thing a newcomer sees answers in words:
nanochat's recipe at toy scale with the project's own core (rustbpe tokenizer, pretraining on the shipped corpus,
then chat fine-tuning with the loss on the answer through <|assistant_end|>, so answers end). Fixed seeds on one
thread: every machine trains the same weights. A toy that answers with sentences it has seen.

    python -m tools.train_demo --out build/demo/nanochat
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core.checkpoint import expected_shapes
from core.config import build_config
from core.gpt import build_gpt
from core.random_checkpoint import CORPUS, model_config_for, random_state_dict, save_checkpoint, tokenizer_for
from core.tokenizer import Tokenizer

CHATS = Path(__file__).parent / "data" / "demo_chats.json"  # a few conversations in nanochat's chat format
SHAPE = dict(depth=4, n_embd=128, n_head=2, n_kv_head=2, sequence_len=512, window_pattern="SSSL")
SEED = 1234
PRETRAIN_STEPS, CHAT_STEPS, BATCH, WINDOW, LR = 400, 300, 8, 96, 3e-3


def chat_examples(tok: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(ids, targets) per conversation; targets are -100 except the assistant's answer and its end token."""
    out = []
    for question, answer in json.loads(CHATS.read_text(encoding="utf-8")):
        prompt = tok.render_for_completion([{"role": "user", "content": question}])
        reply = [*tok.encode(answer), tok.assistant_end]
        ids = prompt + reply
        targets = [-100] * (len(prompt) - 1) + reply + [-100]
        out.append((ids, targets[: len(ids)]))
    return out


def batch_of(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to one length; padding is ignored by the loss (target -100)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r, _ in rows])
    targets = torch.tensor([t + [-100] * (T - len(t)) for _, t in rows])
    return ids, targets


def loss_of(model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    B = ids.shape[0]
    k, v = model.empty_cache(B, 0)  # no cache: every position of a fresh sequence, as in training
    zero, rows = torch.zeros(B, dtype=torch.long), torch.arange(B)
    logits = model(ids, zero, rows, k, v, zero, all_logits=True).logits  # prev_ids: none before position 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def train(out: Path, log=print) -> Path:
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order on every machine
    try:
        t0 = time.perf_counter()
        enc = tokenizer_for(out)
        tok = Tokenizer(enc)
        V = enc.n_vocab
        mc = model_config_for("G4", vocab_size=V, **SHAPE)
        cfg = build_config("G4", mc, padded_vocab_size=-(-V // 64) * 64)
        model = build_gpt(cfg, random_state_dict("G4", mc, cfg.padded_vocab_size, SEED)).train()
        text = tok.encode(CORPUS.read_text(encoding="utf-8"))
        chats = chat_examples(tok)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        gen = torch.Generator().manual_seed(SEED)

        def corpus_rows(n: int) -> list[tuple[list[int], list[int]]]:
            starts = torch.randint(0, len(text) - WINDOW - 1, (n,), generator=gen).tolist()
            return [(text[s: s + WINDOW], text[s + 1: s + WINDOW + 1]) for s in starts]

        total = PRETRAIN_STEPS + CHAT_STEPS
        for step in range(total):
            if step < PRETRAIN_STEPS:
                rows = corpus_rows(BATCH)
            else:  # chat examples, with corpus windows beside them so the words stay
                picks = torch.randint(0, len(chats), (BATCH - 2,), generator=gen).tolist()
                rows = [chats[i] for i in picks] + corpus_rows(2)
            lr = LR * min(1.0, (total - step) / (0.2 * total))  # flat, then down to 0 over the last fifth
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_of(model, *batch_of(rows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == total - 1:
                phase = "pretraining" if step < PRETRAIN_STEPS else "chat tuning"
                log(f"train_demo: step {step + 1}/{total} ({phase}) loss {loss.item():.3f} "
                    f"{time.perf_counter() - t0:.0f}s")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert set(state) == set(expected_shapes(cfg)), "the trained model's keys are nanochat's"
        user = dict(made_by="tools.train_demo", seed=SEED, steps=total, generation="G4", depth=SHAPE["depth"])
        directory = save_checkpoint(out, "sft", "demo", 0, mc, state, user)
        log(f"train_demo: trained in {time.perf_counter() - t0:.0f}s -> {directory}")
        return directory
    finally:
        torch.set_num_threads(threads)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="nanochat base directory to write the checkpoint into")
    a = p.parse_args()
    train(Path(a.out), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
