"""
samosaChaat's `calculator` tool for the registry channel (core/tool_calls.py): arithmetic, math functions and a few
finance helpers (rates in percent), evaluated by walking the AST against a whitelist, never eval. It runs on a server
thread, so the work is bounded by construction (MAX_CHARS, MAX_NODES, MAX_BITS), not by a timer.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

from core.tool_calls import ToolError

MAX_CHARS = 512
MAX_NODES = 128
MAX_BITS = 10_000  # ~3,000 decimal digits: well under Python's 4,300-digit limit on printing an int

Number = int | float

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def calculator(arguments: dict) -> dict:
    """Evaluate arguments["expression"]; {"expression", "value"}, or ToolError with the reason it was refused."""
    expr = str(arguments.get("expression", "")).strip()
    if not expr:
        raise ToolError("Missing expression")
    if len(expr) > MAX_CHARS:
        raise ToolError("expression too long")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes on Python 3.11
        raise ToolError(f"invalid expression: {getattr(e, 'msg', None) or e}") from None
    try:
        value = _Evaluator().eval(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("result too large") from None
    except ValueError as e:  # math domain errors: sqrt(-1), log(0), ...
        raise ToolError(str(e)) from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result is not finite")
        value = float(f"{value:.12g}")
    return {"expression": expr, "value": value}


class _Evaluator:
    """One expression's walk; counts the nodes it visits so a call's work stays bounded."""

    def __init__(self) -> None:
        self.nodes = 0

    def eval(self, node: ast.AST) -> Number:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ToolError("expression too complex")
        if isinstance(node, ast.Constant):
            # bool is an int subclass: refuse it explicitly
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ToolError(f"unsupported constant: {node.value!r}")
            return node.value
        if isinstance(node, ast.BinOp):
            op = _BINARY.get(type(node.op))
            if op is None:
                raise ToolError(f"unsupported operator: {type(node.op).__name__}")
            return op(self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.UAdd):
                return +self.eval(node.operand)
            if isinstance(node.op, ast.USub):
                return -self.eval(node.operand)
            raise ToolError(f"unsupported unary operator: {type(node.op).__name__}")
        if isinstance(node, ast.Name):
            if node.id not in _CONSTANTS:
                raise ToolError(f"unknown symbol: {node.id}")
            return _CONSTANTS[node.id]
        if isinstance(node, ast.Call):
            return self._call(node)
        raise ToolError(f"unsupported expression node: {type(node).__name__}")

    def _call(self, node: ast.Call) -> Number:
        if not isinstance(node.func, ast.Name):
            raise ToolError("only direct function calls are allowed")
        name = node.func.id
        if name not in _FUNCTIONS:
            raise ToolError(f"unsupported function: {name}")
        if node.keywords:
            raise ToolError("keyword arguments are not supported")
        fn, arities = _FUNCTIONS[name]
        if len(node.args) not in arities:  # checked before evaluating the arguments
            expected = " or ".join(str(n) for n in arities)
            raise ToolError(f"{name} expects {expected} argument{'s' if arities != (1,) else ''}, "
                            f"got {len(node.args)}")
        return fn(*(self.eval(arg) for arg in node.args))


def _mul(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_BITS:
        raise ToolError("result too large")
    return a * b


def _pow(base: Number, exp: Number) -> Number:
    if isinstance(base, int) and isinstance(exp, int) and exp >= 0:
        # bit_length * exp bounds the exact result's size; |base| <= 1 costs only the exponent's bits
        if abs(base) > 1 and base.bit_length() * exp > MAX_BITS:
            raise ToolError("result too large")
        return base**exp
    if base == 0 and exp < 0:
        raise ZeroDivisionError
    return math.pow(base, exp)  # float math: refuses (-8) ** 0.5 instead of making a complex number


_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: _mul,
    ast.Div: lambda a, b: a / b,
    ast.Pow: _pow,
    ast.Mod: lambda a, b: a % b,
}


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise ToolError("round ndigits must be an integer")
    # round(int, -n) computes 10**n; past the int's size the answer is 0 anyway
    if isinstance(x, int) and ndigits < -(x.bit_length() + 1):
        return 0
    return round(x, ndigits)


def _percent(value: Number, rate: Number) -> Number:
    return _mul(value, rate) / 100


def _percent_change(old: Number, new: Number) -> Number:
    if old == 0:
        raise ToolError("percent_change old value cannot be zero")
    return (new - old) / old * 100


def _cagr(start: Number, end: Number, years: Number) -> Number:
    if start <= 0 or end <= 0 or years <= 0:
        raise ToolError("cagr inputs must be positive")
    return (_pow(end / start, 1 / years) - 1) * 100


def _simple_interest(principal: Number, annual_rate: Number, years: Number) -> Number:
    return _mul(_mul(principal, annual_rate) / 100, years)


def _compound_interest(principal: Number, annual_rate: Number, periods_per_year: Number, years: Number) -> Number:
    if periods_per_year <= 0:
        raise ToolError("periods_per_year must be positive")
    rate = annual_rate / 100 / periods_per_year
    return principal * _pow(1 + rate, _mul(periods_per_year, years))


def _emi(principal: Number, annual_rate: Number, months: Number) -> Number:
    if months <= 0:
        raise ToolError("months must be positive")
    m = annual_rate / 100 / 12
    growth = _pow(1 + m, months) if m != 0 else 1.0
    if growth == 1:  # a zero rate, or one too small to show in 1 + m
        return principal / months
    return principal * m * growth / (growth - 1)


def _one(fn: Callable[[Number], Number]) -> tuple[Callable[..., Number], tuple[int, ...]]:
    return fn, (1,)


# name -> (function, accepted argument counts)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], tuple[int, ...]]] = {
    "abs": _one(abs),
    "round": (_round, (1, 2)),
    "floor": _one(math.floor),
    "ceil": _one(math.ceil),
    "sqrt": _one(math.sqrt),
    "log": (math.log, (1, 2)),
    "log10": _one(math.log10),
    "exp": _one(math.exp),
    "sin": _one(math.sin),
    "cos": _one(math.cos),
    "tan": _one(math.tan),
    "asin": _one(math.asin),
    "acos": _one(math.acos),
    "atan": _one(math.atan),
    "degrees": _one(math.degrees),
    "radians": _one(math.radians),
    "percent": (_percent, (2,)),
    "percent_change": (_percent_change, (2,)),
    "cagr": (_cagr, (3,)),
    "simple_interest": (_simple_interest, (3,)),
    "compound_interest": (_compound_interest, (4,)),
    "emi": (_emi, (3,)),
}
