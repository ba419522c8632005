"""Fuzzed rollout-server replies never crash or hang the rollout client: whatever a real HTTP
server (`fake_rollout_server.py`) answers to `/v1/completions` (odd statuses, random or
truncated JSON, dropped connections, slow replies, and near-valid completions with the wrong
number of choices or tokens, missing or non-finite logprobs, tokens that are not `token_id:N`),
a `generate` call either returns n well-formed samples per prompt or raises one `RolloutError`,
and every failed attempt is counted."""

from __future__ import annotations

import copy
import json
import math
import re
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_rollout_server import fake_server
from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.client import RolloutClient, RolloutError, Sampling

pytestmark = pytest.mark.unit

SAMPLING = Sampling(n=2, max_tokens=3, temperature=1.0, seed=5)
PROMPTS = [[1, 2], [3]]
TIMEOUT_S = 0.2

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def valid_reply(request: dict[str, Any]) -> dict[str, Any]:
    n, length = int(request["n"]), int(request["max_tokens"])
    return {
        "choices": [
            {
                "index": i,
                "text": "x" * length,
                "finish_reason": "length",
                "logprobs": {
                    "tokens": [f"token_id:{7 + i + t}" for t in range(length)],
                    "token_logprobs": [-0.5] * length,
                },
            }
            for i in range(n)
        ]
    }


# Each edit takes a valid reply and breaks one thing, as a buggy or foreign server would.
def _drop_choice(r: dict[str, Any], v: Any) -> None:
    r["choices"].pop()


def _extra_choice(r: dict[str, Any], v: Any) -> None:
    r["choices"].append(copy.deepcopy(r["choices"][0]))


def _set_logprob(r: dict[str, Any], v: Any) -> None:
    r["choices"][0]["logprobs"]["token_logprobs"][0] = v


def _set_token(r: dict[str, Any], v: Any) -> None:
    r["choices"][-1]["logprobs"]["tokens"][-1] = v


def _no_logprobs(r: dict[str, Any], v: Any) -> None:
    r["choices"][0]["logprobs"] = v


def _short_logprobs(r: dict[str, Any], v: Any) -> None:
    r["choices"][0]["logprobs"]["token_logprobs"].pop()


def _too_long(r: dict[str, Any], v: Any) -> None:
    block = r["choices"][0]["logprobs"]
    block["tokens"].append("token_id:3")
    block["token_logprobs"].append(-1.0)


def _empty(r: dict[str, Any], v: Any) -> None:
    r["choices"][1]["logprobs"] = {"tokens": [], "token_logprobs": []}


def _set_field(r: dict[str, Any], v: Any) -> None:
    r["choices"][0]["text"] = v


def _set_choices(r: dict[str, Any], v: Any) -> None:
    r["choices"] = v


EDITS = [_drop_choice, _extra_choice, _set_logprob, _set_token, _no_logprobs, _short_logprobs,
         _too_long, _empty, _set_field, _set_choices]  # fmt: skip
odd_values = json_values | st.sampled_from(
    ["token_id:", "token_id:x", "token_id:-1", "token_id:²", "7", "NaN", float("nan"),
     float("inf"), float("-inf"), True, None, -0.0, 3]
)  # fmt: skip
replies = st.one_of(
    st.just(("valid", None)),
    st.tuples(st.sampled_from(EDITS), odd_values),
    st.tuples(st.sampled_from([400, 404, 408, 429, 500, 502, 503]), json_values),
    st.tuples(st.just(200), json_values | st.binary(max_size=20)),
    st.sampled_from([("truncate", None), ("drop", None), ("slow", None)]),
)


class Script:
    """Answers the n-th completions request with script[n % len] and records what it served."""

    def __init__(self, script: list[tuple[Any, Any]]) -> None:
        self.script, self.served, self.lock = script, [], threading.Lock()

    def __call__(self, request: dict[str, Any]) -> tuple[int | str, bytes]:
        with self.lock:
            kind, value = self.script[len(self.served) % len(self.script)]
            self.served.append(kind)
        body = valid_reply(request)
        if kind == "valid" or kind == "slow":
            if kind == "slow":
                time.sleep(TIMEOUT_S * 2)
            return 200, json.dumps(body).encode()
        if kind == "truncate":
            return "truncate", json.dumps(body).encode()[:-5]
        if kind == "drop":
            return "drop", b""
        if callable(kind):
            kind(body, value)
            if still_valid(kind, value):
                with self.lock:
                    self.served[self.served.index(kind)] = "valid"
            return 200, json.dumps(body).encode()
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        return int(kind), data


def still_valid(edit: Any, value: Any) -> bool:
    """Edits that some values leave valid: any text, a real logprob, a real token id."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (
        (edit is _set_field and isinstance(value, str))
        or (edit is _set_logprob and number and -math.inf < value <= 0)
        or (
            edit is _set_token
            and isinstance(value, str)
            and re.fullmatch(r"token_id:[0-9]+", value) is not None
        )
    )


def well_formed(out: list[list[Any]]) -> None:
    assert [len(group) for group in out] == [SAMPLING.n] * len(PROMPTS)
    for i, group in enumerate(out):
        for sample in group:
            assert sample.prompt_index == i and sample.prompt_ids == tuple(PROMPTS[i])
            assert 1 <= len(sample.response_ids) == len(sample.logprobs) <= SAMPLING.max_tokens
            assert all(isinstance(t, int) and t >= 0 for t in sample.response_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in sample.logprobs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(replies, min_size=1, max_size=5))
def test_any_reply_is_samples_or_one_counted_rollout_error(script: list[tuple[Any, Any]]) -> None:
    served = Script(script)
    with fake_server(reply=served) as server:
        target = RolloutTarget(
            urls=[server.url], served_model="policy", max_retries=1, timeout_seconds=TIMEOUT_S
        )
        client = RolloutClient(target, backoff_s=0.0)
        started = time.monotonic()
        try:
            out = client.generate(PROMPTS, SAMPLING)
        except RolloutError as err:
            assert str(err) and "Traceback" not in str(err)
            assert sum(client.failures.values()) >= 1  # counted
        else:
            well_formed(out)
            # every reply that was not a completion was a failed, counted, retried attempt
            bad = sum(1 for kind in served.served if kind != "valid")
            assert sum(client.failures.values()) == bad
        # bounded: 2 prompts x (1 try + 1 retry), each at most the timeout, plus slack
        assert time.monotonic() - started < 4 * TIMEOUT_S + 5


def test_a_valid_reply_after_a_dropped_connection_is_marked_as_lost_connection() -> None:
    served = Script([("drop", None)] + [("valid", None)] * 9)
    with fake_server(reply=served) as server:
        target = RolloutTarget(urls=[server.url], served_model="policy", max_retries=1)
        client = RolloutClient(target, backoff_s=0.0)
        well_formed(client.generate(PROMPTS, SAMPLING))
        assert client.lost_connection and client.failures == {"error": 1}
        well_formed(client.generate(PROMPTS, SAMPLING))
        assert not client.lost_connection  # per call


def test_malformed_replies_name_the_server_and_the_problem() -> None:
    for edit, value, needle in [
        (_drop_choice, None, "has 1 completions; asked for n=2"),
        (_set_token, "token_id:x", "not `token_id:N`"),
        (_set_logprob, None, "logprob None, not a finite number"),
        (_too_long, None, "has 4 tokens; asked for 1 to 3"),
    ]:
        with fake_server(reply=Script([(edit, value)])) as server:
            target = RolloutTarget(urls=[server.url], served_model="policy", max_retries=0)
            client = RolloutClient(target, backoff_s=0.0)
            with pytest.raises(RolloutError, match=needle) as caught:
                client.generate(PROMPTS, SAMPLING)
            assert server.url in str(caught.value)
            assert client.failures["malformed"] == 1
