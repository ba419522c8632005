"""Fuzzed judge server replies never crash the judge client: whatever the server answers
(random JSON, odd statuses, half-right completions, timeouts, dropped connections), every
pair ends as a verdict or as a counted drop."""

from __future__ import annotations

import asyncio
import json
from typing import Any, get_args

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_trainer.config import JudgeTarget, ModelSource
from rlhf_trainer.data.chat_format import ChatFormat
from rlhf_trainer.rewards.judge_core import DIGITS, Judge, read_choice
from rlhf_trainer.rollout.completions import CallFailed, CompletionsClient, parse_choices
from rlhf_trainer.runtime.metrics import JudgeOutcome

pytestmark = pytest.mark.unit

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
letters = st.sampled_from(["A", "B", " A", "B ", "C", "", "\ufffd", "A B"])
logprob_values = st.floats(allow_nan=True, allow_infinity=True) | st.none() | st.text(max_size=2)
near_completions = st.builds(
    lambda text, tops, reason: {
        "choices": [{"text": text, "logprobs": {"top_logprobs": tops}, "finish_reason": reason}]
    },
    letters | st.text(max_size=5),
    st.lists(
        st.dictionaries(letters | st.text(max_size=2), logprob_values, max_size=4),
        min_size=1,
        max_size=2,
    )
    | json_values,
    st.none() | st.sampled_from(["length", "stop"]) | st.integers(),
)
replies = st.one_of(
    st.tuples(
        st.sampled_from([200, 200, 200, 400, 404, 429, 500, 503]), near_completions | json_values
    ),
    st.tuples(st.just(200), st.binary(max_size=20)),  # not JSON at all
    st.sampled_from([("timeout", None), ("disconnect", None)]),
)


def transport(script: list[tuple[Any, Any]]) -> httpx.MockTransport:
    calls = iter(range(10**6))

    def handler(request: httpx.Request) -> httpx.Response:
        kind, body = script[next(calls) % len(script)]
        if kind == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if kind == "disconnect":
            raise httpx.RemoteProtocolError("gone", request=request)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(kind, content=content)

    return httpx.MockTransport(handler)


def judge_for(script: list[tuple[Any, Any]], engine: str) -> tuple[Judge, CompletionsClient]:
    target = JudgeTarget(
        urls=["http://judge"],
        served_model="judge",
        engine=engine,
        model=ModelSource(path="/nowhere"),
    )
    client = CompletionsClient(
        ["http://judge"],
        "judge",
        concurrency=4,
        timeout_s=1.0,
        max_retries=1,
        backoff_s=0.0,
        transport=transport(script),
    )
    return Judge(target, ChatFormat(), client), client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(replies, min_size=1, max_size=6), engine=st.sampled_from(["vllm", "lmdeploy"])
)
def test_any_reply_is_a_verdict_or_a_counted_drop(
    script: list[tuple[Any, Any]], engine: str
) -> None:
    async def go() -> None:
        judge, client = judge_for(script, engine)
        async with client:
            judgement = await judge.compare("Q?", "one", "two")
            assert judgement.outcome in get_args(JudgeOutcome)
            if judgement.outcome in ("kept", "disagreed"):
                assert len(judgement.verdicts) == 2
                for verdict in judgement.verdicts:
                    assert verdict.winner in ("A", "B") and 0.0 <= verdict.p_a <= 1.0
                row = judgement.preference_row(judge.protocol)
                assert (row is not None) == (judgement.outcome == "kept")
                if row is not None:
                    assert 0.0 <= row["margin"] <= 1.0
            else:
                assert judgement.preference_row(judge.protocol) is None and judgement.detail
            try:
                score = await judge.score("Q?", "one")
            except CallFailed as err:
                assert err.outcome in ("timeout", "error", "unparseable")
            else:
                assert 0.0 <= score <= 1.0

    asyncio.run(go())


@settings(max_examples=400, deadline=None)
@given(body=near_completions | json_values, options=st.sampled_from([("A", "B"), DIGITS]))
def test_any_body_parses_to_a_choice_or_unparseable(body: Any, options: tuple[str, ...]) -> None:
    try:
        [first, *_] = parse_choices(body)
        choice, probs = read_choice(first, options)
    except CallFailed as err:
        assert err.outcome == "unparseable"
        return
    assert choice in options
    assert not probs or abs(sum(probs.values()) - 1.0) < 1e-9
    assert all(0.0 <= p <= 1.0 for p in probs.values())
