"""
Finds tool calls in sampled tokens for the registry channel (core/tool_calls.py): between the <|python_start|> and
<|python_end|> special tokens, or the same markers written as text, as samosaChaat's models emit them (their
fine-tuning tokenized the markers as plain text). Text is matched on the tokens' bytes, so a marker split across
tokens is still found.
"""

from __future__ import annotations

from core.tokenizer import Tokenizer
from core.tool_calls import CALL_END, CALL_START, MAX_PAYLOAD_CHARS

SPECIAL, TEXT = "special", "text"  # how a call was written: its result goes back in the same form
_START, _END = CALL_START.encode(), CALL_END.encode()


class CallScanner:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self._bytes = tokenizer.byte_table
        self._tail = b""  # the last bytes outside a call: a text marker may begin in an earlier token
        self.form = ""  # SPECIAL or TEXT while inside a call
        self._payload = bytearray()

    def push(self, token: int) -> tuple[str, str] | None:
        """Take one sampled token; returns (form, payload) when it ends a call."""
        t = self.tok
        if token == t.python_start:
            self.form, self._payload, self._tail = SPECIAL, bytearray(), b""
            return None
        if self.form == SPECIAL:
            if token == t.python_end:
                return self._found(bytes(self._payload))
            return self._collect(self._bytes[token] or b"")
        data = self._bytes[token] or b""
        if self.form == TEXT:
            return self._collect(data)
        if token in t.special_set:
            self._tail = b""
            return None
        tail = self._tail + data
        at = tail.find(_START)
        if at < 0:
            self._tail = tail[-(len(_START) - 1):]
            return None
        self.form, self._payload, self._tail = TEXT, bytearray(), b""
        return self._collect(tail[at + len(_START):])

    def reset(self) -> None:
        """Forget any partial marker: the tokens that follow were forced (a result), not sampled."""
        self.form, self._payload, self._tail = "", bytearray(), b""

    def _collect(self, data: bytes) -> tuple[str, str] | None:
        self._payload += data
        if self.form == TEXT and (end := self._payload.find(_END)) >= 0:
            return self._found(bytes(self._payload[:end]))
        if len(self._payload) > 4 * MAX_PAYLOAD_CHARS:  # a runaway call: dropped, the answer goes on as text
            self.reset()
        return None

    def _found(self, payload: bytes) -> tuple[str, str]:
        form = self.form
        self.reset()
        return form, payload.decode("utf-8", errors="replace")
