"""
nanochat's tokenizer and chat format, and an incremental detokenizer for streaming. The tokenizer is the pickled
tiktoken.Encoding that nanochat's tok_train writes, or the same encoding from a tokenizer.json
(core/tokenizer_json.py). Special tokens are never parsed out of user text (encode_ordinary), as in nanochat: a user
cannot forge a turn or a tool call.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from pathlib import Path

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)


class ConversationError(ValueError):
    """A conversation that nanochat's chat format cannot render."""


class Tokenizer:
    def __init__(self, encoding) -> None:
        self.enc = encoding
        missing = [s for s in SPECIAL_TOKENS if s not in encoding._special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks nanochat special tokens: {missing}")
        ids = {s: encoding.encode_single_token(s) for s in SPECIAL_TOKENS}
        self.bos = ids["<|bos|>"]
        self.user_start, self.user_end = ids["<|user_start|>"], ids["<|user_end|>"]
        self.assistant_start, self.assistant_end = ids["<|assistant_start|>"], ids["<|assistant_end|>"]
        self.python_start, self.python_end = ids["<|python_start|>"], ids["<|python_end|>"]
        self.output_start, self.output_end = ids["<|output_start|>"], ids["<|output_end|>"]
        self.special_ids = ids
        self.special_set = frozenset(ids.values())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """nanochat's tokenizer.pkl, or a Hugging Face tokenizer.json made from one (core/tokenizer_json.py)."""
        if Path(path).suffix == ".json":
            from core.tokenizer_json import read_encoding

            return cls(read_encoding(path))
        with open(path, "rb") as f:
            try:
                encoding = pickle.load(f)
            except Exception as e:
                raise ValueError(f"cannot read tokenizer {path}: {e}") from e
        return cls(encoding)

    def save(self, path: str | Path) -> None:
        """The encoding pickled, as nanochat's tokenizer.pkl (what the backend loads)."""
        with open(path, "wb") as f:
            pickle.dump(self.enc, f)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        return self.enc.decode_single_token_bytes(token)

    @functools.cached_property
    def byte_table(self) -> list[bytes | None]:
        """Each id's bytes (None for an id the encoding lacks), built once: the detokenizer looks a streamed token
        up in a list instead of calling into tiktoken."""
        table: list[bytes | None] = []
        for i in range(self.enc.n_vocab):
            try:
                table.append(self.enc.decode_single_token_bytes(i))
            except KeyError:
                table.append(None)
        return table

    # --- chat format ---

    def render_conversation(self, messages: list[dict]) -> list[int]:
        """nanochat's render_conversation without the training mask (and without silent truncation)."""
        messages = list(messages)
        if not messages:
            raise ConversationError("conversation is empty")
        if messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ConversationError("a system message must be followed by a user message")
            merged = {"role": "user", "content": _text(messages[0]) + "\n\n" + _text(messages[1])}
            messages = [merged, *messages[2:]]
        ids = [self.bos]
        for i, msg in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            role = msg.get("role")
            if role != expected:
                raise ConversationError(
                    f"message {i} has role {role!r}; nanochat conversations alternate user/assistant "
                    "starting with user (an optional system message may come first)"
                )
            if role == "user":
                ids += [self.user_start, *self._content(msg), self.user_end]
            else:
                ids += [self.assistant_start, *self._content(msg), self.assistant_end]
        return ids

    def render_for_completion(self, messages: list[dict]) -> list[int]:
        """Render a conversation that ends with a user turn and prime the assistant's reply."""
        if messages and messages[-1].get("role") == "assistant":
            raise ConversationError("the last message must be from the user")
        return [*self.render_conversation(messages), self.assistant_start]

    def render_to_fit(self, messages: list[dict], max_prompt: int) -> tuple[list[int], int]:
        """render_for_completion, dropping the oldest whole turns (a user message and the reply to it)
        until the prompt has at most max_prompt tokens; a leading system message and the last user
        message are always kept. Returns the ids and how many turns were dropped. Each message is
        encoded once, so the cut costs about two renders however many turns go."""
        ids = self.render_for_completion(messages)  # also checks the roles
        if len(ids) <= max_prompt:
            return ids, 0
        system = messages[0] if messages[0].get("role") == "system" else None
        rest = messages[1:] if system else list(messages)  # user, assistant, ..., user
        # Every message but the first user one costs its content plus its two delimiters; the first
        # also carries the system message merged into it, so it is encoded for each candidate.
        sizes = [2 + len(self._content(m)) for m in rest]
        after = [0] * (len(rest) + 1)
        for i in range(len(rest) - 1, -1, -1):
            after[i] = after[i + 1] + sizes[i]
        smallest = len(ids)  # the prompt with every turn but the last dropped, once the loop has run
        for dropped in range(1, len(rest) // 2 + 1):
            first = 2 * dropped
            head = sizes[first] if system is None else 2 + len(self.encode(f"{_text(system)}\n\n{_text(rest[first])}"))
            smallest = 1 + head + after[first + 1] + 1  # bos ... assistant_start
            if smallest <= max_prompt:
                return self.render_for_completion(([system] if system else []) + rest[first:]), dropped
        raise ConversationError(
            f"the last user message{' with the system message' if system else ''} does not fit the context: "
            f"{smallest} tokens, more than the {max_prompt} that leave room for the answer")

    def _content(self, msg: dict) -> list[int]:
        """A message's tokens without its delimiters."""
        if msg["role"] == "user":
            return self.encode(_text(msg))
        return self._assistant_content(msg["content"])

    def _assistant_content(self, content) -> list[int]:
        if isinstance(content, str):
            return self.encode(content)
        ids: list[int] = []
        for part in content:
            kind, text = part.get("type"), part.get("text", "")
            if kind == "text":
                ids += self.encode(text)
            elif kind == "python":
                ids += [self.python_start, *self.encode(text), self.python_end]
            elif kind == "python_output":
                ids += [self.output_start, *self.encode(text), self.output_end]
            else:
                raise ConversationError(f"unknown assistant content part type {kind!r}")
        return ids


def _text(msg: dict) -> str:
    content = msg.get("content")
    if not isinstance(content, str):
        raise ConversationError(f"{msg.get('role')} message content must be a string")
    return content


class Detokenizer:
    """Turns a stream of token ids into text pieces that are always whole UTF-8 characters.

    Equivalent to decoding all ids so far with errors='replace' and emitting the new suffix, but
    O(1) per token: bytes of an unfinished character wait for the next token instead of showing
    as U+FFFD, and spaces are never lost because tokens are joined as bytes before decoding.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._bytes = tokenizer.byte_table
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def push(self, token: int) -> str:
        return self._decode(self._bytes[token])

    def flush(self) -> str:
        return self._decode(b"", final=True)
