"""nanochat's chat format and the streaming detokenizer, on the oracle's real tokenizer."""


import pytest

from core.tokenizer import ConversationError, Detokenizer, Tokenizer
from tests.support.oracles import oracle_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(oracle_tokenizer())


def test_special_ids_come_after_the_merges(tok):
    assert tok.bos == tok.vocab_size - 9 and tok.python_end == tok.vocab_size - 3
    assert tok.decode([tok.python_start]) == "<|python_start|>"


def test_special_token_text_is_ordinary_text(tok):
    assert tok.bos not in tok.encode("<|bos|> hello")


def test_render_conversation(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}]
    ids = tok.render_for_completion(msgs)
    assert ids == [tok.bos, tok.user_start, *tok.encode("hi"), tok.user_end,
                   tok.assistant_start, *tok.encode("yo"), tok.assistant_end,
                   tok.user_start, *tok.encode("ok"), tok.user_end, tok.assistant_start]


def test_system_message_merges_into_first_user_message(tok):
    merged = tok.render_for_completion([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert merged == tok.render_for_completion([{"role": "user", "content": "Be brief.\n\nhi"}])


def test_assistant_tool_parts(tok):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": [{"type": "python", "text": "2+2"},
                                              {"type": "python_output", "text": "4"},
                                              {"type": "text", "text": "four"}]},
            {"role": "user", "content": "thanks"}]
    ids = tok.render_for_completion(msgs)
    want = [tok.assistant_start, tok.python_start, *tok.encode("2+2"), tok.python_end,
            tok.output_start, *tok.encode("4"), tok.output_end, *tok.encode("four"), tok.assistant_end]
    i = ids.index(tok.assistant_start)
    assert ids[i : i + len(want)] == want


@pytest.mark.parametrize("msgs, problem", [
    ([], "empty"),
    ([{"role": "assistant", "content": "x"}], "last message"),
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
    ([{"role": "user", "content": 5}], "string"),
])
def test_bad_conversations_say_why(tok, msgs, problem):
    with pytest.raises(ConversationError, match=problem):
        tok.render_for_completion(msgs)


TEXTS = ["café ☕ 日本語 — naïve façade, Ünïcödé! Ça va? 😀", "  leading and  double  spaces ", "a\nb\n\n  c"]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_pieces_are_whole_characters_and_add_up(tok, text):
    # byte-level tokens split multi-byte characters across tokens; feed them one at a time
    ids = tok.encode(text)
    raw = [tok.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]
    for stream in (ids, raw):
        det = Detokenizer(tok)
        pieces = [det.push(t) for t in stream] + [det.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_equals_decode_with_invalid_bytes(tok):
    stream = [tok.enc.encode_single_token(bytes([b])) for b in b"ok \xe2\x98 x \xff"]
    det = Detokenizer(tok)
    assert "".join([det.push(t) for t in stream] + [det.flush()]) == tok.decode(stream)


def _turns(n: int) -> list[dict]:
    conv = []
    for i in range(n):
        conv += [{"role": "user", "content": f"question {i} " * (i + 1)},
                 {"role": "assistant", "content": f"answer {i}"}]
    return [*conv, {"role": "user", "content": "last question"}]


@pytest.mark.parametrize("system", [False, True])
def test_render_to_fit_drops_the_fewest_oldest_turns(tok, system):
    conv = ([{"role": "system", "content": "Be brief."}] if system else []) + _turns(12)
    head, rest = conv[: int(system)], conv[int(system):]
    full = tok.render_for_completion(conv)
    assert tok.render_to_fit(conv, len(full)) == (full, 0)
    for budget in range(len(full) - 1, 0, -7):
        try:
            ids, dropped = tok.render_to_fit(conv, budget)
        except ConversationError as e:
            # only when the system message and the last user message alone are too long
            assert len(tok.render_for_completion(head + rest[-1:])) > budget and "does not fit the context" in str(e)
            continue
        assert dropped >= 1 and len(ids) <= budget
        assert ids == tok.render_for_completion(head + rest[2 * dropped:])  # whole turns, system kept
        assert len(tok.render_for_completion(head + rest[2 * (dropped - 1):])) > budget  # no more than needed
