"""The rules of the built-in environments (`guess`, `calculator`) and the calculator's safe
evaluator."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf_trainer.environments.builtin import (
    ENVIRONMENTS,
    BadRow,
    CalcError,
    Calculator,
    Guess,
    calculator_demonstration,
    generate_question,
    safe_eval,
)

pytestmark = pytest.mark.unit


def guess(secret: int | None = None, seed: int = 0, **row: int) -> Guess:
    env = Guess()
    opening = env.reset({**row, **({} if secret is None else {"secret": secret})}, seed)
    assert [m["role"] for m in opening] == ["user"]
    return env


def test_registry_builds_fresh_episodes() -> None:
    assert sorted(ENVIRONMENTS) == ["calculator", "guess"]
    assert ENVIRONMENTS["guess"]() is not ENVIRONMENTS["guess"]()


def test_guess_opening_names_the_range() -> None:
    opening = Guess().reset({"low": 3, "high": 7}, seed=0)
    assert opening == [
        {
            "role": "user",
            "content": "I am thinking of a whole number from 3 to 7. "
            "Guess it: reply with just the number.",
        }
    ]


@pytest.mark.parametrize("reply", ["5", "5.", "I guess 5", "My guess is 5!", " 5\n"])
def test_guess_reads_plain_replies(reply: str) -> None:
    assert guess(secret=5).step(reply) == ([], 1.0, True)


def test_guess_follows_hints_to_the_secret() -> None:
    env = guess(secret=7)
    assert env.step("5") == ([{"role": "user", "content": "Higher."}], 0.1, False)
    assert env.step("9") == ([{"role": "user", "content": "Lower."}], 0.1, False)
    messages, reward, done = env.step("7")
    assert (messages, done) == ([], True)
    assert reward == pytest.approx(0.8)  # a solved episode sums to 1.0


def test_guess_pays_no_format_reward_against_a_hint() -> None:
    env = guess(secret=7)
    assert env.step("5").reward == pytest.approx(0.1)
    assert env.step("5") == ([{"role": "user", "content": "Higher."}], 0.0, False)  # repeated
    assert env.step("3").reward == 0.0  # below the hint
    assert env.step("7").reward == pytest.approx(0.9)


def test_guess_caps_the_format_reward() -> None:
    env = guess(secret=10)
    rewards = [env.step(str(n)).reward for n in range(1, 10)]
    assert sum(r or 0.0 for r in rewards) == pytest.approx(0.3)
    assert env.step("10").reward == pytest.approx(0.7)


@pytest.mark.parametrize("reply", ["no idea", "", "eleven", "11", "0", "-3"])
def test_guess_asks_for_a_number_in_range(reply: str) -> None:
    assert guess(secret=5).step(reply) == (
        [{"role": "user", "content": "Reply with just a number from 1 to 10."}],
        0.0,
        False,
    )


def test_following_hints_scores_more_than_ignoring_them() -> None:
    def play(policy: str, secret: int, turns: int = 4) -> float:
        env, low, high, total = guess(secret=secret), 1, 10, 0.0
        for _ in range(turns):
            pick = (low + high) // 2 if policy == "bisect" else 5
            messages, reward, done = env.step(str(pick) if policy != "words" else "hmm")
            total += reward or 0.0
            if done:
                break
            if messages[0]["content"] == "Higher.":
                low = pick + 1
            elif messages[0]["content"] == "Lower.":
                high = pick - 1
        return total

    secrets = range(1, 11)
    bisect = sum(play("bisect", s) for s in secrets)
    stubborn = sum(play("stubborn", s) for s in secrets)
    words = sum(play("words", s) for s in secrets)
    assert bisect == pytest.approx(10.0)  # 4 turns find any of 10 numbers
    assert bisect > stubborn > words == 0.0


def test_guess_secret_from_the_seed_is_reproducible() -> None:
    drawn = []
    for seed in range(20):
        env = Guess()
        env.reset({"low": 1, "high": 10}, seed)
        drawn.append(env.secret)
        again = Guess()
        again.reset({}, seed)
        assert again.secret == env.secret == random.Random(seed).randint(1, 10)
    assert len(set(drawn)) > 3


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"secret": "5"}, "secret"),
        ({"secret": True}, "secret"),
        ({"secret": 11}, "secret"),
        ({"low": 5, "high": 1}, "low"),
        ({"high": 2.5}, "high"),
    ],
)
def test_guess_refuses_bad_rows(row: dict[str, object], field: str) -> None:
    with pytest.raises(BadRow, match=field):
        Guess().reset(row, 0)


def calculator(question: str = "What is 17 * 23 + 4?", answer: object = 395) -> Calculator:
    env = Calculator()
    opening = env.reset({"question": question, "answer": answer}, 0)
    assert [m["role"] for m in opening] == ["system", "user"]
    assert "CALC: <expression>" in opening[0]["content"]
    assert "ANSWER: <number>" in opening[0]["content"]
    assert opening[1]["content"] == question
    return env


@pytest.mark.parametrize(
    ("reply", "result"),
    [
        ("CALC: 17 * 23 + 4", "RESULT: 395"),
        ("Let me compute.\ncalc: `17*23`\nthen add 4", "RESULT: 391"),
        ("CALC: 7 / 2", "RESULT: 3.5"),
        ("CALC: 6 / 3", "RESULT: 2"),
        ("CALC: -(2 + 3) ** 2 % 7", "RESULT: 3"),
        ("CALC: 7 // 0", "ERROR: division by zero"),
        ("CALC: import os", "ERROR: not an arithmetic expression"),
    ],
)
def test_calculator_tool(reply: str, result: str) -> None:
    assert calculator().step(reply) == ([{"role": "tool", "content": result}], 0.0, False)


@pytest.mark.parametrize(
    ("reply", "reward"),
    [
        ("ANSWER: 395", 1.0),
        ("answer: 395.0000000001", 1.0),
        ("ANSWER: 394", 0.0),
        ("The answer is 395.", 1.0),  # a bare number counts as the answer: the last one
        ("17 * 23 + 4 = 395", 1.0),
        ("395", 1.0),
        ("ANSWER: 395 (17 * 23 is 391)", 1.0),  # the first number after ANSWER:
        ("It is 17 * 23 + 5", 0.0),
    ],
)
def test_calculator_answers_end_the_episode(reply: str, reward: float) -> None:
    assert calculator().step(reply) == ([], reward, True)


def test_calculator_compares_numbers() -> None:
    assert calculator(answer="1234.5").step("ANSWER: 1,234.5").reward == 1.0
    assert calculator(answer=-3).step("ANSWER: -3").reward == 1.0


@pytest.mark.parametrize("reply", ["I am not sure.", "ANSWER: unknown", ""])
def test_calculator_reminds_of_the_format(reply: str) -> None:
    messages, reward, done = calculator().step(reply)
    assert (reward, done) == (0.0, False)
    assert [m["role"] for m in messages] == ["user"]
    assert "CALC:" in messages[0]["content"] and "ANSWER:" in messages[0]["content"]


def test_calculator_tool_then_answer() -> None:
    env = calculator()
    assert env.step("CALC: 17 * 23 + 4").messages == [{"role": "tool", "content": "RESULT: 395"}]
    assert env.step("ANSWER: 395") == ([], 1.0, True)


def test_calculator_generates_questions_from_the_seed() -> None:
    for seed in range(50):
        env = Calculator()
        question = env.reset({}, seed)[1]["content"]
        assert question == generate_question(random.Random(seed))[0]
        expression = question.removeprefix("What is ").removesuffix("?")
        assert len(expression.split()) in (3, 5)
        assert env.step(f"ANSWER: {safe_eval(expression)}").reward == 1.0


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "env"


def replay(messages: list[dict[str, str]]) -> float:
    """The reward the calculator gives a whole transcript: its assistant turns stepped in order,
    the environment's replies checked against the transcript's other turns."""
    env = Calculator()
    question = messages[1]["content"]
    answer = safe_eval(question.removeprefix("What is ").removesuffix("?"))
    assert env.reset({"question": question, "answer": answer}, 0) == messages[:2]
    total, rest = 0.0, messages[2:]
    while rest:
        assert rest[0]["role"] == "assistant", rest
        step = env.step(rest[0]["content"])
        total += step.reward or 0.0
        assert step.messages == rest[1 : 1 + len(step.messages)]
        rest = rest[1 + len(step.messages) :]
        assert step.done == (not rest)
    return total


def test_calculator_demonstrations_use_the_tool_and_score() -> None:
    rng = random.Random(3)
    for _ in range(30):
        messages = calculator_demonstration(rng)
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
        assert messages[2]["content"].startswith("CALC: ")
        assert replay(messages) == 1.0


def test_calculator_example_data() -> None:
    """The calculator example's files (examples/smollm2-calculator.yaml): the SFT rows are the
    generator's output for seed 0, each scoring 1.0; the GRPO rows' answers are right."""
    sft = [json.loads(line) for line in (FIXTURES / "calculator-sft.jsonl").open()]
    rng = random.Random(0)
    assert [row["messages"] for row in sft] == [calculator_demonstration(rng) for _ in sft]
    assert all(replay(row["messages"]) == 1.0 for row in sft)
    for line in (FIXTURES / "calculator.jsonl").open():
        row = json.loads(line)
        env = Calculator()
        env.reset(row, 0)
        assert isinstance(row["answer"], str)  # prompts rows keep `answer` a string
        expression = row["question"].removeprefix("What is ").removesuffix("?")
        assert env.step(f"ANSWER: {safe_eval(expression)}").reward == 1.0


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"question": "What is 1 + 1?"}, "answer"),
        ({"question": "What is 1 + 1?", "answer": "two"}, "answer"),
        ({"question": "What is 1 + 1?", "answer": True}, "answer"),
        ({"question": "What is 1 + 1?", "answer": "nan"}, "answer"),
        ({"question": 7, "answer": 2}, "question"),
    ],
)
def test_calculator_refuses_bad_rows(row: dict[str, object], field: str) -> None:
    with pytest.raises(BadRow, match=field):
        Calculator().reset(row, 0)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("17 * 23 + 4", 395),
        ("(1 + 2) * -3", -9),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("7 % 3 + 7 // 2", 4),
        ("+1.5e3", 1500.0),
        ("999999 ** 2", 999998000001),
    ],
)
def test_safe_eval_arithmetic(expression: str, value: float) -> None:
    assert safe_eval(expression) == value


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("x + 1", "names are not allowed"),
        ("__import__('os').system('true')", "function calls are not allowed"),
        ("abs(-1)", "function calls are not allowed"),
        ("(1).real", "attributes are not allowed"),
        ("[1, 2][0]", "subscripts are not allowed"),
        ("'a' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("1j * 1j", "only numbers are allowed"),
        ("1 if 1 else 2", "IfExp is not allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("9 ** 9 ** 9", "exponent 387420489 is larger than 64"),
        ("10 ** 64", "result too large"),
        ("2 ** 63", "result too large"),
        ("10 ** 15 * 10", "result too large"),
        ("1e308 * 10", "result too large"),
        ("0.001 ** -64", "result too large"),
        ("(-8) ** 0.5", "not a real number"),
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 201, "longer than 200 characters"),
    ],
)
def test_safe_eval_refuses(expression: str, why: str) -> None:
    with pytest.raises(CalcError, match=why.replace("(", r"\(")):
        safe_eval(expression)
