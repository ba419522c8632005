"""The judge protocol without a server: verdict parsing, margins, the self-consistency filter,
chat templates and judge templates (docs/ALGORITHMS.md, "AI feedback")."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rlhf_trainer.config import JudgeTarget, JudgeTemplates, ModelSource
from rlhf_trainer.data.chat_format import ChatFormat, Message, load_chat_format
from rlhf_trainer.rewards.judge import fill_failures
from rlhf_trainer.rewards.judge_core import (
    Judge,
    Judgement,
    Verdict,
    agreement,
    choice_probabilities,
    read_choice,
    unlisted_bound,
)
from rlhf_trainer.rollout.completions import CallFailed, Completion, parse_choices
from rlhf_trainer.runtime.metrics import JudgeOutcome

pytestmark = pytest.mark.unit

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def target(**updates: Any) -> JudgeTarget:
    base: dict[str, Any] = {
        "urls": ["http://judge"],
        "served_model": "judge",
        "model": ModelSource(path="/nowhere"),
    }
    return JudgeTarget(**{**base, **updates})


def completion(text: str, top: Mapping[str, float] | None = None) -> Completion:
    logprobs = {"top_logprobs": [dict(top)]} if top is not None else None
    return Completion(text, logprobs, "length")


# -- verdicts ----------------------------------------------------------------------------


def test_probabilities_are_normalised_over_the_two_letters() -> None:
    probs = choice_probabilities({"A": math.log(0.6), "B": math.log(0.2), "C": -0.1}, "AB")
    assert probs["A"] == pytest.approx(0.75) and probs["B"] == pytest.approx(0.25)


def test_token_variants_of_one_letter_add_up() -> None:
    probs = choice_probabilities(
        {" A": math.log(0.3), "A": math.log(0.3), "B\n": math.log(0.2)}, "AB"
    )
    assert probs["A"] == pytest.approx(0.75)


def test_masked_tokens_and_missing_letters() -> None:
    # vLLM reports tokens outside the constrained choice at -9999.
    assert choice_probabilities({"A": 0.0, "<s>": -9999.0}, "AB") == {"A": 1.0, "B": 0.0}
    assert choice_probabilities({"yes": -0.1, "no": -2.0}, "AB") == {}
    assert choice_probabilities({}, "AB") == {}


def test_constrained_text_decides_and_logprobs_give_the_strength() -> None:
    letter, probs = read_choice(completion("B", {"B": math.log(0.7), "A": math.log(0.3)}), "AB")
    assert letter == "B" and probs["B"] == pytest.approx(0.7)


def test_first_token_logprobs_decide_when_the_text_is_no_letter() -> None:
    # lmdeploy: one free token; the likelier letter among its top logprobs is the verdict.
    letter, _ = read_choice(completion(" The", {" The": -0.1, "A": -3.0, "B": -2.0}), "AB")
    assert letter == "B"


@pytest.mark.parametrize("text", ["", "C", "A or B", "\ufffd", "AB"])
def test_garbage_answers_are_unparseable(text: str) -> None:
    with pytest.raises(CallFailed) as err:
        read_choice(completion(text), "AB")
    assert err.value.outcome == "unparseable"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "A",
        3,
        {},
        {"choices": []},
        {"choices": "A"},
        {"choices": [None]},
        {"choices": [{"text": 1}]},
        {"choices": [{"message": {"content": "A"}}]},
        {"error": {"message": "boom"}},
    ],
)
def test_garbage_bodies_are_unparseable(body: Any) -> None:
    with pytest.raises(CallFailed) as err:
        parse_choices(body)
    assert err.value.outcome == "unparseable"


def test_values_that_are_no_logprobs_are_ignored() -> None:
    [c] = parse_choices(
        {
            "choices": [
                {
                    "text": "B",
                    "logprobs": {
                        "top_logprobs": [
                            {"A": 1000.0, "B": -0.5, " A": float("inf"), "A ": float("nan")}
                        ]
                    },
                }
            ]
        }
    )
    assert read_choice(c, "AB") == ("B", {"A": 0.0, "B": 1.0})


def test_odd_logprob_blocks_are_ignored() -> None:
    [c] = parse_choices({"choices": [{"text": "A", "logprobs": {"top_logprobs": [["A", 0]]}}]})
    assert read_choice(c, "AB") == ("A", {})
    [c] = parse_choices(
        {
            "choices": [
                {
                    "text": "A",
                    "logprobs": {"top_logprobs": [{"A": "x", "B": None, "": float("nan")}]},
                }
            ]
        }
    )
    assert read_choice(c, "AB") == ("A", {})


# -- self-consistency and margins ------------------------------------------------------------


def judged(*verdicts: Verdict) -> Judgement:
    outcome: JudgeOutcome = "kept" if agreement(verdicts) else "disagreed"
    return Judgement("x", "first", "second", outcome, verdicts, reference="ref")


def test_orders_that_name_the_same_response_agree() -> None:
    # Order 2 shows the pair swapped: B there is the first response.
    assert agreement([Verdict("A", 0.8), Verdict("B", 0.3)])
    assert agreement([Verdict("B", 0.2), Verdict("A", 0.9)])
    assert not agreement([Verdict("A", 0.8), Verdict("A", 0.6)])  # position bias
    assert not agreement([Verdict("B", 0.4), Verdict("B", 0.1)])
    assert agreement([Verdict("A", 0.6)])  # one order: nothing to disagree with


def test_margin_averages_both_orders() -> None:
    # P(first) = 0.8 in order 1 and 1 - 0.3 = 0.7 in order 2: 0.75 on average.
    j = judged(Verdict("A", 0.8, "c1"), Verdict("B", 0.3, "c2"))
    assert j.p_first == pytest.approx(0.75)
    row = j.preference_row("self-reference")
    assert row is not None
    assert (row["chosen"], row["rejected"]) == ("first", "second")
    assert row["margin"] == pytest.approx(0.75 - 0.25)
    assert row["judge"]["pA"] == [0.8, 0.3] and row["judge"]["critiques"] == ["c1", "c2"]
    assert row["judge"]["reference"] == "ref"


def test_second_response_chosen_with_its_margin() -> None:
    row = judged(Verdict("B", 0.1), Verdict("A", 0.7)).preference_row("direct")
    assert row is not None
    assert (row["chosen"], row["rejected"]) == ("second", "first")
    assert row["margin"] == pytest.approx(0.8 - 0.2)


def test_disagreeing_or_failed_pairs_give_no_row() -> None:
    assert judged(Verdict("A", 0.9), Verdict("A", 0.9)).preference_row("direct") is None
    failed = Judgement("x", "a", "b", "timeout", detail="timed out")
    assert failed.preference_row("direct") is None and failed.p_first is None


def test_failed_rewards_take_the_batch_mean() -> None:
    assert fill_failures([0.2, None, 0.6]) == pytest.approx([0.2, 0.4, 0.6])
    assert fill_failures([None, None]) == [0.5, 0.5]


# -- the protocol over a scripted client -------------------------------------------------------


class Scripted:
    """A stand-in for CompletionsClient: records payloads, answers verdicts by a rule."""

    def __init__(self, prefer: str | None) -> None:
        self.prefer, self.payloads = prefer, []  # type: ignore[var-annotated]

    async def complete(self, payload: Mapping[str, Any]) -> list[Completion]:
        self.payloads.append(dict(payload))
        if payload["max_tokens"] != 1:
            return [completion("my own words")]
        a_part = payload["prompt"].rsplit("A: ", 1)[1]
        letter = "A" if self.prefer is None or a_part.startswith(self.prefer) else "B"
        other = "B" if letter == "A" else "A"
        return [completion(letter, {letter: math.log(0.8), other: math.log(0.2)})]


def run_compare(prefer: str | None, **updates: Any) -> tuple[Judgement, Scripted]:
    client = Scripted(prefer)
    judge = Judge(target(**updates), ChatFormat(), client)  # type: ignore[arg-type]
    return asyncio.run(judge.compare("Q?", "good", "bad")), client


def test_self_reference_protocol_turns_and_orders() -> None:
    j, client = run_compare("good")
    assert j.outcome == "kept" and j.reference == "my own words"
    assert j.p_first == pytest.approx(0.8)
    kinds = ["verdict" if p["max_tokens"] == 1 else "text" for p in client.payloads]
    assert kinds.count("text") == 3  # one reference (shared), one critique per order
    assert kinds.count("verdict") == 2
    verdicts = [p for p in client.payloads if p["max_tokens"] == 1]
    assert all(p["structured_outputs"] == {"choice": ["A", "B"]} for p in verdicts)
    assert all(p["temperature"] == 0.0 and p["logprobs"] > 0 for p in verdicts)
    prompts = [p["prompt"] for p in verdicts]
    assert any("A: good" in p and "B: bad" in p for p in prompts)
    assert any("A: bad" in p and "B: good" in p for p in prompts)
    assert all("my own words" in p and "Which response is best for humanity?" in p for p in prompts)


def test_position_bias_is_filtered() -> None:
    j, _ = run_compare(None)  # always "A"
    assert j.outcome == "disagreed" and j.preference_row("self-reference") is None


def test_direct_protocol_has_no_reference_turn() -> None:
    j, client = run_compare("good", self_reference=False, critique=False, engine="lmdeploy")
    assert j.outcome == "kept" and j.reference is None
    assert [p["max_tokens"] for p in client.payloads] == [1, 1]
    assert all("structured_outputs" not in p for p in client.payloads)
    assert all("Request: Q?" in p["prompt"] for p in client.payloads)


# -- chat templates ---------------------------------------------------------------------------

CHAT: list[Message] = [
    {"role": "user", "content": "Q?"},
    {"role": "assistant", "content": "R."},
    {"role": "user", "content": "A or B?"},
]


def test_plain_transcript_without_a_chat_template() -> None:
    text = ChatFormat().render(CHAT)
    assert text == "Human: Q?\n\nAssistant: R.\n\nHuman: A or B?\n\nAssistant:"


def test_model_chat_template_is_used_and_bos_left_to_the_server() -> None:
    text = ChatFormat(CHATML, bos_token="<s>").render(CHAT)
    assert text.startswith("<|im_start|>user\nQ?<|im_end|>")
    assert text.endswith("<|im_start|>user\nA or B?<|im_end|>\n<|im_start|>assistant\n")


def write_model(folder: Path, config: dict[str, Any], jinja: str | None = None) -> ModelSource:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return ModelSource(path=str(folder))


def test_load_chat_format_from_a_model_folder(tmp_path: Path) -> None:
    plain = load_chat_format(write_model(tmp_path / "a", {"bos_token": "<s>"}))
    assert plain.template is None
    inline = load_chat_format(
        write_model(tmp_path / "b", {"chat_template": CHATML, "bos_token": {"content": "<s>"}})
    )
    assert inline.template == CHATML and inline.bos_token == "<s>"
    named = load_chat_format(
        write_model(
            tmp_path / "c",
            {
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": CHATML},
                ]
            },
        )
    )
    assert named.template == CHATML
    as_file = load_chat_format(write_model(tmp_path / "d", {}, jinja=CHATML))
    assert as_file.template == CHATML
    override = load_chat_format(write_model(tmp_path / "e", {"chat_template": CHATML}), "{{ 1 }}")
    assert override.render(CHAT) == "1"


def test_broken_chat_template_is_a_user_error(tmp_path: Path) -> None:
    from rlhf_trainer.errors import UserError

    with pytest.raises(UserError, match="not valid Jinja"):
        load_chat_format(write_model(tmp_path / "m", {"chat_template": "{% for %}"}))


# -- judge templates --------------------------------------------------------------------------


def test_default_templates_render() -> None:
    t = JudgeTemplates()
    text = t.compare.format(a="x", b="y", prompt="p", principle="P?")
    assert "A: x" in text and "B: y" in text and "P?" in text


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("compare", "A: {a}", "needs ['a', 'b']"),
        ("verdict", "{prompt} A or B?", "may use ['principle']"),
        ("score", "{response} {x}", "uses ['response', 'x']"),
        ("reference", "{prompt", "literal braces"),
    ],
)
def test_bad_templates_are_refused_naming_the_field(field: str, value: str, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        JudgeTemplates(**{field: value})
    message = str(err.value)
    assert needle in message


def test_literal_braces_are_allowed() -> None:
    t = JudgeTemplates(verdict="{principle} Reply as {{A}} or {{B}}.")
    assert t.verdict.format(principle="P") == "P Reply as {A} or {B}."


# -- strength when the letters are missing from the top logprobs (issue 25, item 3) ----------


class TopScripted(Scripted):
    """Prefers "good" like Scripted, but answers each verdict with the given top logprobs:
    `tops(letter)` for the letter it names."""

    def __init__(self, tops: Any) -> None:
        super().__init__("good")
        self.tops = tops

    async def complete(self, payload: Mapping[str, Any]) -> list[Completion]:
        [c] = await super().complete(payload)
        if payload["max_tokens"] != 1:
            return [c]
        return [completion(c.text, self.tops(c.text))]


def judge_with(tops: Any) -> Judgement:
    judge = Judge(target(), ChatFormat(), TopScripted(tops))  # type: ignore[arg-type]
    return asyncio.run(judge.compare("Q?", "good", "bad"))


def test_unlisted_bound_is_the_smallest_listed_and_the_mass_left() -> None:
    assert unlisted_bound({"x": math.log(0.5), "y": math.log(0.1)}) == pytest.approx(0.1)
    assert unlisted_bound({"x": math.log(0.7), "y": math.log(0.25)}) == pytest.approx(0.05)
    assert unlisted_bound({"A": 0.0}) == 0.0  # the listed token holds all the mass
    assert unlisted_bound({}) == 0.0


def test_a_missing_letter_is_bounded_not_zero() -> None:
    # 20 listed tokens, A among them at 0.5, B not: P(B) <= the smallest listed, 0.01.
    top = {"A": math.log(0.5), **{f"t{i}": math.log(0.01) for i in range(19)}}
    letter, probs = read_choice(completion("A", top), "AB", bound_missing=True)
    assert letter == "A" and probs["B"] == pytest.approx(0.01 / 0.51)
    assert read_choice(completion("A", top), "AB")[1] == {"A": 1.0, "B": 0.0}  # old reading


def test_a_bound_never_changes_the_choice() -> None:
    # lmdeploy: the free token is no letter and B is the least likely listed token, so the
    # bound on A equals P(B); the verdict is still the listed letter.
    top = {" The": math.log(0.5), "B": math.log(0.1)}
    letter, probs = read_choice(completion(" The", top), "AB", bound_missing=True)
    assert letter == "B" and probs == {"A": pytest.approx(0.5), "B": pytest.approx(0.5)}


def test_one_letter_missing_gives_a_margin_below_the_maximum() -> None:
    # Each order lists only the named letter (0.6) beside filler tokens down to 0.02.
    def tops(letter: str) -> dict[str, float]:
        return {letter: math.log(0.6), **{f"t{i}": math.log(0.02) for i in range(19)}}

    j = judge_with(tops)
    assert j.outcome == "kept" and j.strength_known
    row = j.preference_row("self-reference")
    assert row is not None and row["chosen"] == "good"
    p = 0.6 / 0.62
    assert [v.p_a for v in j.verdicts] == [pytest.approx(p), pytest.approx(1 - p)]
    assert row["margin"] == pytest.approx(2 * p - 1, abs=1e-6) and row["margin"] < 1.0


def test_no_letter_listed_keeps_the_verdict_with_the_minimum_margin() -> None:
    j = judge_with(lambda letter: {"x": math.log(0.4), "y": math.log(0.3)})
    assert j.outcome == "kept" and not j.strength_known
    assert [v.winner for v in j.verdicts] == ["A", "B"]
    assert not any(v.strength_known for v in j.verdicts) and j.p_first == 0.5
    row = j.preference_row("self-reference")
    assert row is not None and (row["chosen"], row["rejected"]) == ("good", "bad")
    assert row["margin"] == 0.0 and row["judge"]["pA"] == [None, None]


def test_an_order_of_unknown_strength_is_left_out_of_the_average() -> None:
    known = Verdict("A", 0.8)
    unknown = Verdict("B", 0.5, strength_known=False)
    j = judged(known, unknown)
    assert j.p_first == pytest.approx(0.8)
    row = j.preference_row("direct")
    assert row is not None and row["margin"] == pytest.approx(0.6)
    assert row["judge"]["pA"] == [0.8, None]
