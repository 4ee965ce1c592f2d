"""samosaChaat's calculator tool: operators, functions, finance helpers, every refusal, bounded work, and its place
in the registry channel."""

import json
import math
import tracemalloc

import pytest

from core.calculator_tool import MAX_BITS, MAX_CHARS, MAX_NODES, calculator
from core.tool_calls import ToolError, ToolRegistry, parse_call


def value(expr):
    return calculator({"expression": expr})["value"]


def refused(expr):
    with pytest.raises(ToolError) as info:
        calculator({"expression": expr})
    return str(info.value)


def peak_bytes(expr):
    """The tracemalloc peak of one call, answered or refused."""
    tracemalloc.start()
    try:
        calculator({"expression": expr})
    except ToolError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_output_shape_and_ints_stay_ints():
    assert calculator({"expression": "  2+3 "}) == {"expression": "2+3", "value": 5}
    assert type(value("7 - 10")) is int
    assert value("7 - 10") == -3


@pytest.mark.parametrize(("expr", "expected"), [
    ("2 + 3", 5), ("2 - 5", -3), ("6 * 7", 42), ("7 / 2", 3.5), ("2 ** 10", 1024), ("17 % 5", 2),
    ("-(3)", -3), ("+4", 4), ("2 ** -2", 0.25), ("4 ** 0.5", 2.0), ("5.5 % 2", 1.5), ("(1 + 2) * 3", 9),
])
def test_operators(expr, expected):
    assert value(expr) == expected


def test_constants():
    assert value("pi") == float(f"{math.pi:.12g}")
    assert value("e") == float(f"{math.e:.12g}")
    assert value("tau") == float(f"{math.tau:.12g}")


def test_twelve_significant_digits():
    assert value("1/3") == 0.333333333333
    assert value("2/3") == 0.666666666667
    assert value("0.1 + 0.2") == 0.3
    assert value("100000/7") == 14285.7142857


@pytest.mark.parametrize(("expr", "expected"), [
    ("abs(-3)", 3), ("round(2.567, 2)", 2.57), ("round(2.5)", 2), ("round(1234, -2)", 1200), ("floor(2.7)", 2),
    ("ceil(2.1)", 3), ("sqrt(16)", 4.0), ("log(e)", 1.0), ("log(8, 2)", 3.0), ("log10(1000)", 3.0),
    ("exp(0)", 1.0), ("sin(0)", 0.0), ("cos(0)", 1.0), ("tan(0)", 0.0), ("acos(1)", 0.0),
    ("asin(1)", float(f"{math.pi / 2:.12g}")), ("atan(1)", float(f"{math.pi / 4:.12g}")), ("degrees(pi)", 180.0),
    ("radians(180)", 3.14159265359),
])
def test_functions(expr, expected):
    assert value(expr) == expected


def test_round_int_far_left_is_zero_without_building_ten_to_the_n():
    assert value("round(5, -100000000)") == 0
    assert value("round(999, -3)") == 1000
    assert refused("round(1.5, 0.5)") == "round ndigits must be an integer"


def test_percent():
    assert value("percent(250, 12)") == pytest.approx(250 * 12 / 100)


def test_percent_change():
    assert value("percent_change(80, 100)") == pytest.approx((100 - 80) / 80 * 100)
    assert value("percent_change(100, 80)") == pytest.approx(-20.0)
    assert refused("percent_change(0, 5)") == "percent_change old value cannot be zero"


def test_cagr():
    assert value("cagr(100, 200, 5)") == pytest.approx(((200 / 100) ** (1 / 5) - 1) * 100)
    assert value("cagr(100, 200, 5)") == pytest.approx(14.8698, abs=1e-4)
    for expr in ("cagr(0, 200, 5)", "cagr(100, -1, 5)", "cagr(100, 200, 0)"):
        assert refused(expr) == "cagr inputs must be positive"


def test_simple_interest():
    assert value("simple_interest(10000, 7.5, 3)") == pytest.approx(10000 * 7.5 / 100 * 3)


def test_compound_interest():
    assert value("compound_interest(1000, 10, 12, 2)") == pytest.approx(1000 * (1 + 10 / 100 / 12) ** (12 * 2))
    assert value("compound_interest(1000, 5, 1, 3)") == pytest.approx(1157.625)
    assert refused("compound_interest(1000, 5, 0, 3)") == "periods_per_year must be positive"


def test_emi():
    m = 12 / 100 / 12
    g = (1 + m) ** 12
    assert value("emi(100000, 12, 12)") == pytest.approx(100000 * m * g / (g - 1))
    assert value("emi(100000, 12, 12)") == pytest.approx(8884.88, abs=0.01)
    assert value("emi(1200, 0, 12)") == 100.0
    assert refused("emi(1000, 5, 0)") == "months must be positive"


@pytest.mark.parametrize(("expr", "name"), [
    ("sqrt(1, 2)", "sqrt"), ("log(1, 2, 3)", "log"), ("round()", "round"), ("percent(1)", "percent"),
    ("cagr(1, 2)", "cagr"), ("compound_interest(1, 2, 3)", "compound_interest"), ("emi(1, 2, 3, 4)", "emi"),
    ("percent_change(1, 2, 3)", "percent_change"), ("simple_interest(1, 2)", "simple_interest"),
])
def test_wrong_argument_count_names_the_function(expr, name):
    assert refused(expr).startswith(f"{name} expects ")


@pytest.mark.parametrize("arguments", [{}, {"expression": ""}, {"expression": "   "}])
def test_missing_expression(arguments):
    with pytest.raises(ToolError, match=r"^Missing expression$"):
        calculator(arguments)


def test_length_and_syntax_and_complexity():
    assert refused("1" * (MAX_CHARS + 1)) == "expression too long"
    assert value("1" * MAX_CHARS) == int("1" * MAX_CHARS)
    assert refused("2 +").startswith("invalid expression: ")
    assert refused("x = 1").startswith("invalid expression: ")
    assert refused("+".join(["1"] * (MAX_NODES // 2 + 1))) == "expression too complex"  # 129 nodes
    assert value("+".join(["1"] * (MAX_NODES // 2))) == MAX_NODES // 2  # 127 nodes
    assert refused("-" * 500 + "1") == "expression too complex"


@pytest.mark.parametrize(("expr", "message"), [
    ("True", "unsupported constant: True"), ("None", "unsupported constant: None"),
    ("'a'", "unsupported constant: 'a'"), ("1j", "unsupported constant: 1j"),
    ("7 // 2", "unsupported operator: FloorDiv"), ("1 << 2", "unsupported operator: LShift"),
    ("2 @ 3", "unsupported operator: MatMult"), ("not 1", "unsupported unary operator: Not"),
    ("~1", "unsupported unary operator: Invert"), ("x", "unknown symbol: x"),
    ("__import__", "unknown symbol: __import__"), ("__import__('os')", "unsupported function: __import__"),
    ("eval('1')", "unsupported function: eval"), ("sqrt", "unknown symbol: sqrt"),
    ("math.sqrt(4)", "only direct function calls are allowed"),
    ("(lambda: 1)()", "only direct function calls are allowed"),
    ("round(2.5, ndigits=1)", "keyword arguments are not supported"),
    ("(1).real", "unsupported expression node: Attribute"), ("pi.__class__", "unsupported expression node: Attribute"),
    ("[1, 2][0]", "unsupported expression node: Subscript"), ("lambda: 1", "unsupported expression node: Lambda"),
    ("1 < 2", "unsupported expression node: Compare"), ("1 if 1 else 2", "unsupported expression node: IfExp"),
    ("sqrt(*[4])", "unsupported expression node: Starred"), ("(1, 2)", "unsupported expression node: Tuple"),
])
def test_refused_nodes(expr, message):
    assert refused(expr) == message


@pytest.mark.parametrize(("expr", "message"), [
    ("1 / 0", "division by zero"), ("1 % 0", "division by zero"), ("0 ** -1", "division by zero"),
    ("log(8, 1)", "division by zero"), ("sqrt(-1)", "math domain error"), ("log(0)", "math domain error"),
    ("(-8) ** 0.5", "math domain error"), ("10.0 ** 400", "result too large"), ("exp(1000)", "result too large"),
    ("1e308 * 10", "result is not finite"), ("1e999 - 1e999", "result is not finite"),
    ("floor(1e308 * 10)", "result too large"), ("2 ** 20000 / 1", "result too large"),
])
def test_arithmetic_errors(expr, message):
    assert refused(expr) == message


@pytest.mark.parametrize("expr", [
    "9**9**9", "2**100000", "10**5000*10**5000", "99999999**999", "(9999999999**290)**2",
    "*".join(["9999999999**290"] * 3), "1**2**100000",
])
def test_huge_integers_are_refused(expr):
    assert refused(expr) == "result too large"


def test_integer_results_stay_printable():
    big = value("2**" + str(MAX_BITS // 2))  # at the bound: computed exactly
    assert big == 2 ** (MAX_BITS // 2)
    assert json.dumps(big)
    assert value("(-1)**99999") == -1
    assert value("0**0") == 1


@pytest.mark.parametrize("expr", [
    "9**9**9", "2**100000", "10**5000*10**5000", "9**(9**9) % 7", "1**2**100000",
    "*".join(["9999999999"] * 46),  # the longest chain of them that fits MAX_CHARS
    "*".join(["9999999999**290"] * 32),  # refused at the first product
    "*".join(["9"] * 128),  # 255 nodes: refused as too complex
    "+".join(["2**5000"] * 32),
])
def test_bounded_work(expr):
    assert peak_bytes(expr) < 1_000_000


def test_chain_of_products_is_exact():
    expr = "*".join(["9999999999"] * 46)
    assert len(expr) <= MAX_CHARS
    assert value(expr) == 9999999999**46


def test_registry_payload():
    registry = ToolRegistry({"calculator": calculator})
    result = registry.execute(parse_call('{"tool":"calculator","arguments":{"expression":"2+3"}}'))
    assert json.loads(result.payload()) == {"error": None, "metadata": {}, "output": {"expression": "2+3", "value": 5},
                                            "success": True, "tool": "calculator"}
    assert result.payload() == ('{"error":null,"metadata":{},"output":{"expression":"2+3","value":5},'
                                '"success":true,"tool":"calculator"}')


def test_registry_legacy_expression_and_failure():
    registry = ToolRegistry({"calculator": calculator})
    call = parse_call("2+3*4")
    assert call.tool == "calculator"
    assert registry.execute(call).output == {"expression": "2+3*4", "value": 14}
    failed = registry.execute(parse_call("1/0"))
    assert (failed.success, failed.error, failed.output) == (False, "division by zero", None)
