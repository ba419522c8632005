"""The built-in multi-turn environments: `guess` (a number with higher/lower hints) and
`calculator` (a question answered with the help of a calculator tool).

Each environment is a class whose instance holds one episode: `reset(row, seed)` returns the
opening chat messages and `step(text)` answers one assistant turn with `StepResult(messages,
reward, done)`. `rlhf_trainer.environments.server` serves any of `ENVIRONMENTS` over HTTP
(docs/ENVIRONMENTS.md). Standard library only: the server image needs no torch.
"""

from __future__ import annotations

import ast
import math
import operator
import random
import re
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

Message = dict[str, str]  # {"role": "system" | "user" | "tool", "content": str}


class StepResult(NamedTuple):
    messages: list[Message]  # what the environment adds: user or tool turns, maybe none
    reward: float | None  # None: no reward for this turn (counts as 0.0 in the episode's sum)
    done: bool


class BadRow(ValueError):
    """A dataset row the environment cannot start an episode from; the message names the field."""


class Environment(Protocol):
    """One episode. A fresh instance per episode; `reset` is called once, then `step`."""

    def reset(self, row: dict[str, Any], seed: int) -> list[Message]: ...

    def step(self, text: str) -> StepResult: ...


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


def _int_field(row: dict[str, Any], key: str, default: int) -> int:
    value = row.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRow(f"row field {key!r} must be a whole number, got {value!r}")
    return value


FIRST_INTEGER = re.compile(r"-?\d+")


class Guess:
    """Guess a whole number from `low` to `high` with "Higher." / "Lower." hints.

    Row: optional `secret`, `low` (default 1) and `high` (default 10), all integers. Without
    `secret`, it is drawn from `random.Random(seed)`.

    Each assistant turn is read as the first integer in its text ("5", "5.", "I guess 5" and
    "My guess is 5!" are all 5). Rewards:
    - no integer, or one outside low..high: 0.0, and a user message asking for a number;
    - a wrong guess inside the range that every earlier hint allows: 0.1 (a format reward,
      paid for at most 3 turns), and the hint "Higher." or "Lower.";
    - any other wrong guess (repeated, or against a hint): 0.0, and the hint;
    - the secret: 1.0 minus the format rewards already paid, done, no message.
    So a solved episode sums to exactly 1.0 however many turns it took, an unsolved one to at
    most 0.3, and a policy that answers with numbers and follows the hints scores more than
    one that does not.
    """

    FORMAT_REWARD = 0.1
    MAX_FORMAT_TURNS = 3

    def __init__(self) -> None:
        self.low, self.high, self.secret = 1, 10, 1
        self.allowed_low, self.allowed_high = 1, 10  # what the hints so far leave possible
        self.paid = 0.0
        self.format_turns = 0

    def reset(self, row: dict[str, Any], seed: int) -> list[Message]:
        low, high = _int_field(row, "low", 1), _int_field(row, "high", 10)
        if low > high:
            raise BadRow(f"row fields 'low' ({low}) and 'high' ({high}): low must be <= high")
        secret = _int_field(row, "secret", random.Random(seed).randint(low, high))
        if not low <= secret <= high:
            raise BadRow(f"row field 'secret' ({secret}) is not from {low} to {high}")
        self.low, self.high, self.secret = low, high, secret
        self.allowed_low, self.allowed_high = low, high
        return [
            _user(
                f"I am thinking of a whole number from {low} to {high}. "
                "Guess it: reply with just the number."
            )
        ]

    def step(self, text: str) -> StepResult:
        found = FIRST_INTEGER.search(text)
        guess = int(found.group()) if found else None
        if guess is None or not self.low <= guess <= self.high:
            return StepResult([_user(f"Reply with just a number from {self.low} to {self.high}.")],
                              0.0, False)  # fmt: skip
        if guess == self.secret:
            # Rounded so that the episode's sum is 1.0 up to float addition, not 0.7000000000000001.
            return StepResult([], round(1.0 - self.paid, 6), True)
        reward = 0.0
        consistent = self.allowed_low <= guess <= self.allowed_high
        if consistent and self.format_turns < self.MAX_FORMAT_TURNS:
            reward = self.FORMAT_REWARD
            self.format_turns += 1
            self.paid += reward
        if guess < self.secret:
            self.allowed_low = max(self.allowed_low, guess + 1)
            return StepResult([_user("Higher.")], reward, False)
        self.allowed_high = min(self.allowed_high, guess - 1)
        return StepResult([_user("Lower.")], reward, False)


class CalcError(ValueError):
    """An expression the calculator refuses; the message says why."""


MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e15  # of every literal and intermediate result
MAX_EXPONENT = 64
BINARY_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
REFUSED = {
    ast.Name: "names are not allowed",
    ast.Call: "function calls are not allowed",
    ast.Attribute: "attributes are not allowed",
    ast.Subscript: "subscripts are not allowed",
}


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression: int and float literals, + - * / // % **,
    parentheses and unary minus/plus. Nothing else is evaluated (no names, calls, attributes);
    literals and intermediate results stay within 1e15 in magnitude and exponents within 64, so
    no input can take long. Raises CalcError saying why an expression is refused."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("not an arithmetic expression") from None
    return _eval(tree.body)


def _eval(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalcError(f"only numbers are allowed, not {value!r}")
        return _bounded(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(BINARY_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError("result too large") from None
    for kind, why in REFUSED.items():
        if isinstance(node, kind):
            raise CalcError(why)
    raise CalcError(f"{type(node).__name__} is not allowed; use numbers and + - * / // % **")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} is larger than {MAX_EXPONENT}")
    # Checked before computing: 999999 ** 64 is cheap, but its size is refused anyway.
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > 15:
        raise CalcError("result too large")


def _bounded(value: Any) -> int | float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CalcError("result is not a real number")  # (-8) ** 0.5 is complex
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result too large")
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError("result too large")
    return value


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


# Thousands separators ("1,234") are read as one number.
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
CALC = re.compile(r"CALC:\s*(.*)", re.IGNORECASE)
ANSWER = re.compile(r"ANSWER:\s*(.*)", re.IGNORECASE | re.DOTALL)
CALC_SYSTEM = (
    "You can use a calculator. To use the calculator, reply with `CALC: <expression>` on its "
    "own; you will get the result. When you know the answer, reply `ANSWER: <number>`."
)


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in NUMBER.findall(text)]


class Calculator:
    """Answer an arithmetic question, with a calculator tool.

    Row: `question` (str) and `answer` (a number, or a string of one). A row without `question`
    gets one from `random.Random(seed)`: two or three integers from 1 to 20 joined by + - *.
    The episode opens with a system message explaining the tool and a user message asking the
    question. Each assistant turn, in this order:
    - contains `CALC:` (any case): the rest of that line (backticks stripped) is evaluated by
      `safe_eval`; a `tool` message "RESULT: <value>" or "ERROR: <why>", reward 0.0;
    - contains `ANSWER:`: the first number after it is the answer; reward 1.0 if it is within
      1e-6 of the row's answer, else 0.0; done. No number after it: a reminder, reward 0.0;
    - contains any number: the last number in the text is taken as the answer, as with
      `ANSWER:` (so a model that just answers can score);
    - otherwise: a user message reminding of the format, reward 0.0.
    """

    TOLERANCE = 1e-6

    def __init__(self) -> None:
        self.answer = 0.0

    def reset(self, row: dict[str, Any], seed: int) -> list[Message]:
        question = row.get("question")
        if question is None:
            question, self.answer = generate_question(random.Random(seed))
        elif not isinstance(question, str) or not question.strip():
            raise BadRow(f"row field 'question' must be a non-empty string, got {question!r}")
        else:
            self.answer = _row_answer(row.get("answer"))
        return [{"role": "system", "content": CALC_SYSTEM}, _user(question)]

    def step(self, text: str) -> StepResult:
        calc = CALC.search(text)
        if calc:
            expression = calc.group(1).strip().strip("`").strip()
            try:
                content = f"RESULT: {format_number(safe_eval(expression))}"
            except CalcError as err:
                content = f"ERROR: {err}"
            return StepResult([{"role": "tool", "content": content}], 0.0, False)
        answer = ANSWER.search(text)
        numbers = _numbers(answer.group(1))[:1] if answer else _numbers(text)[-1:]
        if not numbers:
            return StepResult([_user(self.reminder())], 0.0, False)
        correct = abs(numbers[0] - self.answer) <= self.TOLERANCE
        return StepResult([], 1.0 if correct else 0.0, True)

    @staticmethod
    def reminder() -> str:
        return "Reply `CALC: <expression>` to use the calculator, or `ANSWER: <number>`."


def _row_answer(value: Any) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        number = float(value)
    except ValueError:
        raise BadRow(f"row field 'answer' must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadRow(f"row field 'answer' must be finite, got {value!r}")
    return number


def generate_question(rng: random.Random) -> tuple[str, float]:
    """A question of two or three integers from 1 to 20 joined by + - *, and its answer."""
    terms = [str(rng.randint(1, 20)) for _ in range(rng.choice((2, 3)))]
    expression = terms[0]
    for term in terms[1:]:
        expression += f" {rng.choice('+-*')} {term}"
    return f"What is {expression}?", float(safe_eval(expression))


def calculator_demonstration(rng: random.Random) -> list[Message]:
    """A whole calculator episode that uses the tool and scores 1.0, as chat messages: the
    opening, `CALC: <expression>`, the tool's result, `ANSWER: <result>`. Rows of these are SFT
    data (`format: chat`) that teach a model the tool's format before GRPO
    (examples/smollm2-calculator.yaml)."""
    question, answer = generate_question(rng)
    expression = question.removeprefix("What is ").removesuffix("?")
    result = format_number(answer)
    return [
        {"role": "system", "content": CALC_SYSTEM},
        _user(question),
        {"role": "assistant", "content": f"CALC: {expression}"},
        {"role": "tool", "content": f"RESULT: {result}"},
        {"role": "assistant", "content": f"ANSWER: {result}"},
    ]


ENVIRONMENTS: dict[str, Callable[[], Environment]] = {"calculator": Calculator, "guess": Guess}
