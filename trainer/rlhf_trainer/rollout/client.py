"""The rollout client: a step's prompts to the rollout servers as one large concurrent batch.

Every prompt of a step is one `/v1/completions` request (token ids in, `n` samples out, with
the sampled tokens' logprobs and a per-prompt seed), and all of them are in flight at once
(bounded by `concurrency` per replica), spread round-robin over every replica. There is never a
small batch after another. Timeouts and bounded retries come from `completions.CompletionsClient`;
a request that still fails ends the step with a `RolloutError` naming the server. A reply that
is not `n` well-formed samples (missing or non-finite logprobs, tokens that are not
`token_id:N`, more tokens than `max_tokens`) is a `RolloutError` too, never a half-read batch.
Failed attempts are counted (`failures`, and rlhf_trainer_rollout_failures_total{outcome});
`lost_connection` tells whether the last call lost a connection, after which a server may be a
restarted one that holds its start-up weights (the feed then re-syncs and probes).

Token ids travel both ways (`return_tokens_as_token_ids`), so the trainer scores exactly the
tokens that were sampled, with no re-tokenisation. The logprobs are vLLM's raw ones (of the
model's own distribution, before temperature and top-p), the same quantity the trainer computes.
Torch-free.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf_trainer.config import RolloutTarget
from rlhf_trainer.rollout.completions import CallFailed, Completion, CompletionsClient, wait_ready
from rlhf_trainer.runtime import metrics as prom

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
    # Multi-turn episodes (episodes.py): 1 on the tokens the policy generated, 0 on those the
    # environment added (no loss); None: every response token was generated.
    trained_mask: tuple[int, ...] | None = None
    reward: float | None = None  # an episode's reward from its environment


def generated_tokens(sample: Sample) -> int:
    """The response tokens the policy generated (an episode's environment turns excluded)."""
    mask = sample.trained_mask
    return len(sample.response_ids) if mask is None else sum(mask)


def parse_sample(
    prompt_index: int, prompt_ids: Sequence[int], choice: Completion, max_tokens: int | None = None
) -> Sample:
    """A choice with logprobs and `token_id:N` tokens -> Sample; RolloutError if malformed."""
    block = choice.logprobs or {}
    tokens, logprobs = block.get("tokens"), block.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list):
        raise RolloutError("a completion came back without logprobs; is it an OpenAI server?")
    if len(tokens) != len(logprobs):
        raise RolloutError("a completion has different numbers of tokens and logprobs")
    if not tokens or (max_tokens is not None and len(tokens) > max_tokens):
        raise RolloutError(f"a completion has {len(tokens)} tokens; asked for 1 to {max_tokens}")
    return Sample(
        prompt_index,
        tuple(prompt_ids),
        tuple(_token_id(t) for t in tokens),
        tuple(_logprob(v) for v in logprobs),
        choice.finish_reason,
    )


def _token_id(token: object) -> int:
    text = token.removeprefix(TOKEN_PREFIX) if isinstance(token, str) else ""
    if not isinstance(token, str) or text == token or not (text.isascii() and text.isdigit()):
        raise RolloutError(
            f"a completion token is {token!r}, not `token_id:N`; the server ignored "
            "return_tokens_as_token_ids (use vLLM)"
        )
    return int(text)


def _logprob(value: object) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and math.isfinite(value) and value <= 0:  # type: ignore[arg-type,operator]
        return float(value)  # type: ignore[arg-type]
    raise RolloutError(f"a completion has the logprob {value!r}, not a finite number <= 0")


def parse_group(
    prompt_index: int, prompt_ids: Sequence[int], choices: Sequence[Completion], sampling: Sampling
) -> list[Sample]:
    """One prompt's `sampling.n` choices -> Samples; RolloutError if there are not n or one is
    malformed."""
    if len(choices) != sampling.n:
        raise RolloutError(f"a reply has {len(choices)} completions; asked for n={sampling.n}")
    return [parse_sample(prompt_index, prompt_ids, c, sampling.max_tokens) for c in choices]


def _payload(
    prompt_ids: Sequence[int], sampling: Sampling, index: int, stops: Sequence[int] = ()
) -> dict[str, Any]:
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
    if stops:
        payload["stop_token_ids"] = list(stops)
    return payload


class RolloutGenerator(Protocol):
    """What the online loop generates with: `RolloutClient` (servers) or the trainer's own
    engine (`engine.TrainerEngine`, `rollout.engine: trainer`)."""

    lost_connection: bool  # during the last `generate` (a server may have restarted)

    @property
    def urls(self) -> list[str]: ...

    def wait_ready(self) -> None: ...

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        urls: Sequence[str] | None = None,
    ) -> list[list[Sample]]: ...

    def probe(self, prompt: Sequence[int], max_tokens: int, url: str) -> Sample:
        """The parity probe's sample from one replica, with that replica's logprobs."""
        ...


class RolloutClient:
    """Generates on a stage's rollout servers (`RolloutTarget`, rendered by the operator)."""

    def __init__(
        self, target: RolloutTarget, backoff_s: float = 0.5, stop_token_ids: Iterable[int] = ()
    ) -> None:
        self.target = target
        # Sent with every request: the chat template's end-of-turn token may not be among the
        # EOS ids of the served model's generation config, where vLLM stops by itself.
        self.stop_token_ids = sorted(stop_token_ids)
        self.backoff_s = backoff_s  # first retry delay, doubling (completions.MAX_BACKOFF_S)
        self.failures: collections.Counter[str] = collections.Counter()  # attempts, by outcome
        self.lost_connection = False  # during the last `generate`

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

    def probe(self, prompt: Sequence[int], max_tokens: int, url: str) -> Sample:
        """A greedy answer to `prompt` from the replica at `url`, with its logprobs."""
        greedy = Sampling(n=1, max_tokens=max_tokens, temperature=0.0)
        return self.generate([prompt], greedy, urls=[url])[0][0]

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
            backoff_s=self.backoff_s,
        )
        self.lost_connection = False
        try:
            async with client:
                stops = self.stop_token_ids
                calls = [
                    client.complete(_payload(p, sampling, i, stops)) for i, p in enumerate(prompts)
                ]
                results = await asyncio.gather(*calls)
            return [
                parse_group(i, prompts[i], choices, sampling) for i, choices in enumerate(results)
            ]
        except CallFailed as err:
            raise RolloutError(
                f"rollout request failed after {target.max_retries} retries ({err.outcome}): "
                f"{err}; check that the rollout server is up (its pod or log)"
            ) from None
        except RolloutError as err:
            self._count({"malformed": 1})
            raise RolloutError(f"{', '.join(urls)}: {err}") from None
        finally:
            self._count(client.failed_attempts)
            self.lost_connection = client.connection_errors > 0

    def _count(self, failures: Mapping[Any, int]) -> None:
        for outcome, count in failures.items():
            self.failures[outcome] += count
            prom.count_rollout_failure(outcome, count)
