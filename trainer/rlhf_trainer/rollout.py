"""The rollout client: a step's prompts to the rollout servers as one large concurrent batch.

Every prompt of a step is one `/v1/completions` request (token ids in, `n` samples out, with
the sampled tokens' logprobs and a per-prompt seed), and all of them are in flight at once
(bounded by `concurrency` per replica), spread round-robin over every replica. There is never a
small batch after another. Timeouts and bounded retries come from `completions.CompletionsClient`;
a request that still fails ends the step with a `RolloutError` naming the server.

Token ids travel both ways (`return_tokens_as_token_ids`), so the trainer scores exactly the
tokens that were sampled, with no re-tokenisation. The logprobs are vLLM's raw ones (of the
model's own distribution, before temperature and top-p), the same quantity the trainer computes.
Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_trainer.completions import CallFailed, Completion, CompletionsClient, wait_ready
from rlhf_trainer.config import RolloutTarget

log = logging.getLogger(__name__)

TOKEN_PREFIX = "token_id:"


class RolloutError(RuntimeError):
    """Generation failed for good: a server is gone or answers nonsense."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generation call."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    """One sampled response. `logprobs[i]` is the server's log-probability of `response_ids[i]`."""

    prompt_index: int  # position of its prompt in the call's prompt list
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str | None


def parse_sample(prompt_index: int, prompt_ids: Sequence[int], choice: Completion) -> Sample:
    """A choice with logprobs and `token_id:N` tokens -> Sample; RolloutError if malformed."""
    block = choice.logprobs or {}
    tokens, logprobs = block.get("tokens"), block.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list):
        raise RolloutError("a completion came back without logprobs; is it an OpenAI server?")
    if len(tokens) != len(logprobs):
        raise RolloutError("a completion has different numbers of tokens and logprobs")
    ids: list[int] = []
    for token in tokens:
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            raise RolloutError(
                f"a completion token is {token!r}, not `token_id:N`; the server ignored "
                "return_tokens_as_token_ids (use vLLM)"
            )
        ids.append(int(token.removeprefix(TOKEN_PREFIX)))
    values = tuple(float(v) if isinstance(v, int | float) else float("nan") for v in logprobs)
    return Sample(prompt_index, tuple(prompt_ids), tuple(ids), values, choice.finish_reason)


def _payload(prompt_ids: Sequence[int], sampling: Sampling, index: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "prompt": list(prompt_ids),
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    if sampling.temperature > 0:
        payload["seed"] = sampling.seed + index  # reproducible, and distinct per prompt
    return payload


class RolloutClient:
    """Generates on a stage's rollout servers (`RolloutTarget`, rendered by the operator)."""

    def __init__(self, target: RolloutTarget) -> None:
        self.target = target

    @property
    def urls(self) -> list[str]:
        return list(self.target.urls)

    def wait_ready(self) -> None:
        """Block until every replica has its model loaded (startupTimeoutSeconds)."""
        asyncio.run(wait_ready(self.urls, self.target.startup_timeout_seconds))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        urls: Sequence[str] | None = None,
    ) -> list[list[Sample]]:
        """`sampling.n` samples for every prompt, all requests concurrently; [prompt][sample].

        `urls` narrows the call to some replicas (the parity probe asks each one in turn).
        """
        started = time.perf_counter()
        out = asyncio.run(self._generate(prompts, sampling, list(urls or self.urls)))
        tokens = sum(len(s.response_ids) for group in out for s in group)
        log.debug(
            "Generated %d tokens for %d prompts in %.2fs",
            tokens,
            len(prompts),
            time.perf_counter() - started,
        )
        return out

    async def _generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, urls: list[str]
    ) -> list[list[Sample]]:
        target = self.target
        client = CompletionsClient(
            urls,
            target.served_model,
            concurrency=target.concurrency * len(urls),
            timeout_s=target.timeout_seconds,
            max_retries=target.max_retries,
        )
        async with client:
            calls = [client.complete(_payload(p, sampling, i)) for i, p in enumerate(prompts)]
            try:
                results = await asyncio.gather(*calls)
            except CallFailed as err:
                raise RolloutError(
                    f"rollout request failed after {target.max_retries} retries ({err.outcome}): "
                    f"{err}; check that the rollout server is up (its pod or log)"
                ) from None
        return [
            [parse_sample(i, prompts[i], choice) for choice in choices]
            for i, choices in enumerate(results)
        ]

