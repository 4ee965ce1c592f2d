"""
The chat history a client sends -> a conversation nanochat's chat format renders. The gateway sends histories
the strict format refuses (its last 50 messages, so a chat may start with an answer; two user messages after a
failed turn) and its reference service renders them, so the BFF repairs them instead of answering 400. What is
still wrong after the repair is the client's fault.
"""

from __future__ import annotations

from bff.errors import BadRequest

JOINER = "\n\n"  # between joined messages of one role, as nanochat joins a system message to the first user one


def normalize(messages: list[dict]) -> list[dict]:
    """Alternating user/assistant turns, starting and ending with the user (after an optional system
    message). `messages` have passed the request schema: role and non-empty string content each."""
    # a system message stays first (the backend merges it into the first user message)
    out = [{"role": "system", "content": messages[0]["content"]}] if messages[0]["role"] == "system" else []
    start = len(out)
    for message in messages[start:]:
        role = message["role"]
        if len(out) == start and role == "assistant":
            continue  # the window began mid-conversation: its first answer has no question
        if len(out) > start and out[-1]["role"] == role:
            out[-1]["content"] += JOINER + message["content"]  # joined in order: nothing the user wrote is lost
        else:
            out.append({"role": role, "content": message["content"]})
    if len(out) == start:
        raise BadRequest("body.messages: no user message")
    if out[-1]["role"] != "user":
        raise BadRequest("body.messages: the last message must be from the user")
    return out
