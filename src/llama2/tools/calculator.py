"""An exact arithmetic evaluator for the calculator tool: the expression is parsed with Python's `ast` and only
numbers, + - * / // % **, unary signs and parentheses are evaluated, over fractions (never `eval`). Sizes are
bounded, so no expression can take long or use much memory."""

from __future__ import annotations

import ast
import operator
from fractions import Fraction

from ..errors import Llama2Error

MAX_CHARS = 200  # expression length
MAX_EXPONENT = 64
MAX_DIGITS = 300  # digits of any intermediate numerator or denominator
DECIMALS = 10  # a non-integer result is shown rounded to this many decimal places

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SYMBOLS = {"×": "*", "÷": "/", "−": "-", "^": "**"}


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; Llama2Error naming the problem otherwise."""
    if not isinstance(expression, str) or not expression.strip():
        raise Llama2Error("the calculator needs an arithmetic expression, e.g. '4821 + 3967'")
    if len(expression) > MAX_CHARS:
        raise Llama2Error(f"expression longer than {MAX_CHARS} characters")
    text = expression
    for symbol, python in _SYMBOLS.items():
        text = text.replace(symbol, python)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise Llama2Error(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(Fraction(str(node.value)))  # 0.1 is one tenth, not the nearest binary float
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise Llama2Error("division by zero")
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > MAX_EXPONENT:
                raise Llama2Error(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if a == 0 and b < 0:
                raise Llama2Error("division by zero")
            if max(len(str(abs(a.numerator))), len(str(a.denominator))) * abs(int(b)) > MAX_DIGITS:
                raise Llama2Error(f"the result would have more than {MAX_DIGITS} digits")
            return _bounded(a ** int(b))
        return _bounded(_BINARY[type(node.op)](a, b))
    raise Llama2Error("only numbers, + - * / // % ** and parentheses are allowed")


def _bounded(v: Fraction) -> Fraction:
    if max(len(str(abs(v.numerator))), len(str(v.denominator))) > MAX_DIGITS:
        raise Llama2Error(f"a number in the calculation has more than {MAX_DIGITS} digits")
    return v


def format_number(v: Fraction) -> str:
    """An integer as it is; anything else as a decimal rounded to DECIMALS places, trailing zeros dropped."""
    if v.denominator == 1:
        return str(v.numerator)
    scaled = round(v * 10 ** DECIMALS)
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10 ** DECIMALS)
    digits = str(frac).rjust(DECIMALS, "0").rstrip("0")
    return f"{sign}{whole}" + (f".{digits}" if digits else "")


def calculate(expression: str) -> str:
    """The calculator tool: the expression's exact value as text."""
    return format_number(evaluate(expression))
