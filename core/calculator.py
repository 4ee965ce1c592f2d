"""
nanochat's calculator tool: nanochat's rules decide what is evaluated (arithmetic without **, or string .count()
calls), and anything else or any error gives None, so nothing is forced. nanochat bounds the work with a 3 s SIGALRM,
which works only on the main thread (elsewhere every call silently gives None); a server thread evaluates here, so the
work is bounded by construction instead.
"""

from __future__ import annotations

import ast
import warnings

_MATH_CHARS = set("0123456789*+-/.() ")
_STRING_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
              "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
MAX_STRING = 100_000  # characters of any string a tool call may build


class Refused(Exception):
    """The expression would do more work than a tool call may."""


def _evaluate(expr: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            result = eval(expr, {"__builtins__": {}}, {})
        str(result)  # an int past Python's 4300 digits cannot be printed into the forced tokens
    except Exception:  # wrong calculator usage is expected and ignored, as in nanochat
        return None
    return result


def _grown(s: str, method: str, args: list) -> int:
    """An upper bound on the length of getattr(s, method)(*args), computed without building it."""
    if method in ("ljust", "rjust", "center", "zfill"):
        return max(len(s), args[0] if args and isinstance(args[0], int) else 0)
    if method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        hits = len(s) + 1 if old == "" else s.count(old)
        return len(s) + hits * max(0, len(new) - len(old))
    if method == "join" and args and isinstance(args[0], str):
        return len(args[0]) + len(s) * max(0, len(args[0]) - 1)
    if method == "expandtabs":
        return len(s) * max(1, args[0] if args and isinstance(args[0], int) else 8)
    return 3 * len(s) + 1  # every other str method keeps the length (case changes at most triple it)


def _walk(node: ast.AST):
    """Evaluate a string expression's tree: literals, parentheses, and str method calls, with Python's own
    operations (so nanochat's results), but a call that would build more than MAX_STRING characters
    (`'a'.ljust(10**9)`) is refused before it runs."""
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.keywords:
        target = _walk(node.func.value)
        if not isinstance(target, str) or node.func.attr.startswith("_") or not hasattr(str, node.func.attr):
            raise Refused("only string methods may be called")
        args = [_walk(a) for a in node.args]
        if _grown(target, node.func.attr, args) > MAX_STRING:
            raise Refused(f"{node.func.attr} would build more than {MAX_STRING} characters")
        return getattr(target, node.func.attr)(*args)
    raise Refused(f"{type(node).__name__} is not allowed in a string expression")


def _evaluate_string(expr: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return _walk(ast.parse(expr, mode="eval"))
    except Exception:  # wrong usage or more work than allowed: nanochat's failure, nothing forced
        return None


def use_calculator(expr: str):
    """Evaluate a tool expression by nanochat's rules; None when it is rejected or fails."""
    expr = expr.replace(",", "")
    if all(c in _MATH_CHARS for c in expr):
        if "**" in expr:  # without it (and names) the work grows with the expression's length
            return None
        return _evaluate(expr)
    if not all(c in _STRING_CHARS for c in expr):
        return None
    lowered = expr.lower()
    if any(word in lowered for word in _DANGEROUS):
        return None
    if ".count(" not in expr:
        return None
    return _evaluate_string(expr)
