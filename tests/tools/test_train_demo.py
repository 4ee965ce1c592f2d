"""
`make demo`'s model (tools/train_demo.py): trained here as make demo trains it, it answers the README's
request in words and ends its answer, and so does it for a question it never saw.
"""

from __future__ import annotations

import pytest

from core.checkpoint import find_checkpoint, open_checkpoint
from core.generation import SamplingParams, generate
from core.gpt import TorchRunner, build_gpt
from tools.serve import README_PROMPT

MAX_TOKENS = 64  # what the README's curl line asks for


@pytest.fixture(scope="module")
def demo(demo_training):
    base, lines = demo_training()  # python -m tools.train_demo, as make demo runs it
    assert any("pretraining" in line for line in lines) and "trained in" in lines[-1]  # progress lines
    loaded, tok = open_checkpoint(find_checkpoint("sft", "demo", nanochat_base=base))
    return build_gpt(loaded.config, loaded.state_dict), tok


def answer(demo, question: str) -> tuple[str, bool]:
    model, tok = demo
    prompt = tok.render_for_completion([{"role": "user", "content": question}])
    tokens = [t for t, _ in generate(TorchRunner(model, 1, 512), tok, prompt, SamplingParams(0.0, None, MAX_TOKENS, 0))]
    ended = tokens[-1] == tok.assistant_end
    return tok.decode([t for t in tokens if t != tok.assistant_end]), ended


@pytest.mark.parametrize("question", [README_PROMPT, "What is the capital of France?", "hi"])
def test_the_demo_answers_in_words_and_ends(demo, question):
    text, ended = answer(demo, question)
    assert ended, f"no <|assistant_end|> within {MAX_TOKENS} tokens: {text!r}"
    assert text.isprintable() and "\ufffd" not in text, text
    words = [w.strip(".,!?:;") for w in text.split()]
    assert len(words) >= 3 and all(w.isalpha() for w in words if w), text


def test_the_readme_excerpt_is_what_it_answers(demo):
    # seeds fixed, one thread: the same weights, so the same greedy answer, on every machine
    from tools.paths import PROJECT

    text, _ = answer(demo, README_PROMPT)
    assert f'"{text}"' in (PROJECT / "README.md").read_text()
