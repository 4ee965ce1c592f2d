"""
nanochat's calculator tool: the same restricted rules decide what gets evaluated.

Two kinds of expression pass: pure arithmetic (digits, + - * / . ( ) and spaces, commas removed,
no **), and string .count() calls (letters, digits, quotes, parens, '.', '_' and spaces, none of
nanochat's dangerous words). Anything else, and any evaluation error, gives None, and then nothing
is forced into the stream.

nanochat bounds evaluation with a 3 s SIGALRM, which only works on the main thread (and silently
turns every tool call on another thread into None). The rules above already bound the work: no
power operator, no names, no loops, so the cost grows with the expression's length. We therefore
evaluate directly, on any thread, with builtins removed as nanochat does.
"""

from __future__ import annotations

import warnings

_MATH_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
              "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


def _evaluate(expr: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return eval(expr, {"__builtins__": {}}, {})
    except Exception:  # wrong calculator usage is expected and ignored, as in nanochat
        return None


def use_calculator(expr: str):
    """Evaluate a tool expression by nanochat's rules; None when it is rejected or fails."""
    expr = expr.replace(",", "")
    if all(c in _MATH_CHARS for c in expr):
        if "**" in expr:
            return None
        return _evaluate(expr)
    if not all(c in _STRING_CHARS for c in expr):
        return None
    lowered = expr.lower()
    if any(word in lowered for word in _DANGEROUS):
        return None
    if ".count(" not in expr:
        return None
    return _evaluate(expr)
