"""
A Hugging Face tokenizer.json read back into the tiktoken.Encoding it was made from. transformers' converter
(convert_tiktoken_to_fast) writes nanochat's encoding as a byte-level BPE whose ids are tiktoken's ranks, so reading
it back is exact and core.tokenizer works unchanged. Only that shape is accepted: a tokenizer that would encode
differently from tiktoken is refused.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from core.tokenizer import SPECIAL_TOKENS


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the rest map to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def read_encoding(path: str | Path):
    """The tiktoken.Encoding of a byte-level BPE tokenizer.json; ValueError naming the file and the field."""
    import tiktoken

    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokenizer {path}: {e}") from e

    def refuse(field: str, why: str) -> ValueError:
        return ValueError(f"tokenizer {path}: {field} {why}; only a byte-level BPE as transformers' "
                          "convert_tiktoken_to_fast writes nanochat's tokenizer can be read")

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise refuse("model.type", f"is {model.get('type')!r}, not BPE")
    if spec.get("normalizer") is not None:
        raise refuse("normalizer", "is set (tiktoken normalizes nothing)")
    pattern, byte_level = None, False
    pre = spec.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise refuse("pre_tokenizer Split", "is not behavior Isolated, invert false")
            pattern = (step.get("pattern") or {}).get("Regex")
        elif step.get("type") == "ByteLevel":
            if step.get("add_prefix_space") or step.get("use_regex"):
                raise refuse("pre_tokenizer ByteLevel", "adds a prefix space or its own regex")
            byte_level = True
        else:
            raise refuse("pre_tokenizer", f"has a {step.get('type')!r} step")
    if pattern is None or not byte_level:
        raise refuse("pre_tokenizer", "is not a Split regex followed by ByteLevel")

    special = {}
    for token in spec.get("added_tokens", []):
        if not token.get("special"):
            raise refuse("added_tokens", f"hold {token.get('content')!r}, which is not special (nanochat's "
                                         "tokenizers add only special tokens)")
        special[token["content"]] = token["id"]
    lacking = [s for s in SPECIAL_TOKENS if s not in special]
    if lacking:
        raise refuse("added_tokens", f"lack nanochat's special tokens {lacking}")
    # a special token may also sit in the vocabulary under its own id; tiktoken keeps it a special token only
    vocab = {token: rank for token, rank in model.get("vocab", {}).items() if special.get(token) != rank}
    clash = sorted(set(special.values()) & set(vocab.values()))
    if clash:
        raise refuse("added_tokens", f"reuse ids of other tokens in model.vocab: {clash[:8]}")

    decode = byte_decoder()
    try:
        ranks = {bytes(decode[c] for c in token): rank for token, rank in vocab.items()}
    except KeyError as e:
        raise refuse("model.vocab", f"has a character outside the byte-level alphabet ({e})") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise refuse("model.vocab", f"lacks single bytes {missing[:8]}")
    # tiktoken merges by the rank of the merged token; a BPE whose merges come in another order encodes otherwise
    order = [vocab.get("".join(pair if isinstance(pair, list) else pair.split(" ", 1)))
             for pair in model.get("merges", [])]  # ["a", "b"], or "a b" in older files
    if None in order or any(x > y for x, y in itertools.pairwise(order)):
        raise refuse("model.merges", "are not in the order of their merged tokens' ids (ranks)")
    try:
        return tiktoken.Encoding(name=path.parent.name or "tokenizer.json", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=special)
    except Exception as e:  # tiktoken's core raises for a pattern its regex engine cannot compile
        raise refuse("pre_tokenizer Split pattern", f"cannot be used by tiktoken ({e})") from e
