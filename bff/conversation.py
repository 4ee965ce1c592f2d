"""
The chat history a client sends -> a conversation nanochat's chat format can render.

The gateway builds histories the strict format refuses: it sends at most its last 50 stored messages (so a
long chat starts with an assistant message), and a turn that failed leaves two user messages in a row.
The reference service renders them anyway, so the BFF repairs them instead of answering 400: leading
assistant messages are dropped, and consecutive messages of one role are joined in order, separated by a
blank line. A system message stays first (the backend merges it into the first user message). What is
still wrong after that (no user message, a last message that is not the user's) is the client's fault.
"""

from __future__ import annotations

from bff.errors import BadRequest

JOINER = "\n\n"  # between joined messages of one role, as nanochat joins a system message to the first user one


def normalize(messages: list[dict]) -> list[dict]:
    """Alternating user/assistant turns, starting and ending with the user (after an optional system
    message). `messages` have passed the request schema: role and non-empty string content each."""
    out = [{"role": "system", "content": messages[0]["content"]}] if messages[0]["role"] == "system" else []
    start = len(out)
    for message in messages[start:]:
        role = message["role"]
        if len(out) == start and role == "assistant":
            continue  # the window began mid-conversation: its first answer has no question
        if len(out) > start and out[-1]["role"] == role:
            out[-1]["content"] += JOINER + message["content"]
        else:
            out.append({"role": role, "content": message["content"]})
    if len(out) == start:
        raise BadRequest("body.messages: no user message")
    if out[-1]["role"] != "user":
        raise BadRequest("body.messages: the last message must be from the user")
    return out
