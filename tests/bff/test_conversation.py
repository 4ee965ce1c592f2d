"""bff.conversation: the histories the gateway builds, repaired into nanochat conversations."""

import pytest

from bff.conversation import normalize
from bff.errors import BadRequest


def m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_a_valid_conversation_is_unchanged():
    conv = [m("system", "be brief"), m("user", "a"), m("assistant", "b"), m("user", "c")]
    assert normalize(conv) == conv


def test_leading_assistant_messages_are_dropped():
    # the gateway's 50-message window began mid-conversation
    assert normalize([m("assistant", "x"), m("assistant", "y"), m("user", "q")]) == [m("user", "q")]
    assert normalize([m("system", "s"), m("assistant", "x"), m("user", "q")]) == [m("system", "s"), m("user", "q")]


def test_consecutive_messages_of_one_role_are_joined_in_order():
    # a stopped or failed turn left a user message without an answer
    conv = [m("user", "a"), m("user", "b"), m("assistant", "c"), m("assistant", "d"), m("user", "e"), m("user", "f")]
    assert normalize(conv) == [m("user", "a\n\nb"), m("assistant", "c\n\nd"), m("user", "e\n\nf")]


def test_the_input_is_not_modified():
    conv = [m("user", "a"), m("user", "b")]
    normalize(conv)
    assert conv == [m("user", "a"), m("user", "b")]


@pytest.mark.parametrize(("conv", "detail"), [
    ([m("assistant", "x")], "no user message"),
    ([m("system", "s")], "no user message"),
    ([m("user", "q"), m("assistant", "a")], "last message must be from the user"),
])
def test_what_cannot_be_repaired_is_a_400(conv, detail):
    with pytest.raises(BadRequest) as e:
        normalize(conv)
    assert detail in e.value.description
