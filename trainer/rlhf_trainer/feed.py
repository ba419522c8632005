"""Rollouts for each step: prompts in order, generated on the servers by rank 0, broadcast.

Synchronous by default: step t's prompts are generated with the weights the servers hold
after step t-1's sync. With `async: true`, step t+1's prompts are generated in a background
thread while step t trains (on the weights of step t), so each batch is one step off-policy;
the algorithms then take the importance ratio against the servers' behaviour logprobs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from rlhf_trainer.batching import DataStream
from rlhf_trainer.distributed import broadcast_object
from rlhf_trainer.rollout import Sample, Sampling

if TYPE_CHECKING:
    from rlhf_trainer.online_setup import OnlineSetup

SEED_STRIDE = 1_000_003  # per-step seed offset; prompts within a step add their index


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens; long prompts lose their start."""
    ids = tokenizer(list(prompts))["input_ids"]
    return [list(row)[-max_len:] for row in ids]


@dataclass(frozen=True)
class StepRollouts:
    """One step's prompts and samples, `n` per prompt, prompt-major."""

    prompts: list[str]
    samples: list[Sample]  # prompt i's samples at [i * n, (i + 1) * n); Sample.prompt_index = i
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutFeed:
    """Step -> rollouts. Rank 0 generates; every rank gets the same StepRollouts."""

    def __init__(
        self, setup: OnlineSetup, stream: DataStream, sampling: Sampling, prompts_per_step: int
    ) -> None:
        self.setup, self.stream, self.sampling = setup, stream, sampling
        self.per_step = prompts_per_step
        self.trained = (stream.epoch, stream.index)  # where the next trained batch starts
        self.pending: Future[StepRollouts] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1) if setup.async_ else None

    def seek(self, epoch: int, index: int) -> None:
        self.stream = DataStream(self.stream.n, self.stream.seed, epoch, index)
        self.trained = (epoch, index)

    def position(self) -> tuple[int, int]:
        """Prompt position after the last batch handed out (what a checkpoint records)."""
        return self.trained

    def epochs_done(self) -> float:
        epoch, index = self.trained
        return epoch + index / max(self.stream.n, 1)

    def next(self, step: int, prefetch: bool) -> StepRollouts:
        """The rollouts of `step` (collective). In async mode also starts generating the next
        step's, which the servers answer with the current weights."""
        out: StepRollouts | None = None
        if self.setup.ctx.is_main:
            out = self.pending.result() if self.pending is not None else self._generate(step)
            self.pending = None
            self.trained = (self.stream.epoch, self.stream.index)
            if self.pool is not None and prefetch:
                self.pending = self.pool.submit(self._generate, step + 1)
        out = cast(StepRollouts, broadcast_object(out))
        self.trained = cast(tuple[int, int], broadcast_object(self.trained))
        return out

    def settle(self) -> None:
        """Wait for the generation in flight (a weight sync must not overlap it)."""
        if self.pending is not None:
            wait_futures([self.pending])

    def _generate(self, step: int) -> StepRollouts:
        setup = self.setup
        assert setup.client is not None
        rows = [setup.inputs.train_rows[i] for i in self.stream.next_batch(self.per_step)]
        prompts = [row.prompt for row in rows]
        ids = prompt_token_ids(setup.tokenizer, prompts, setup.max_prompt)
        sampling = replace(
            self.sampling, seed=setup.inputs.config.hyperparameters.seed + step * SEED_STRIDE
        )
        started = time.perf_counter()
        groups = setup.client.generate(ids, sampling)
        seconds = time.perf_counter() - started
        samples = [s for group in groups for s in group]
        tokens = sum(len(s.response_ids) for s in samples)
        truncated = sum(1 for s in samples if s.finish_reason == "length")
        metrics = {
            "generate_s": seconds,
            "generate_tokens_per_s": tokens / max(seconds, 1e-9),
            "response_length": tokens / max(len(samples), 1),
            "truncated_fraction": truncated / max(len(samples), 1),
        }
        return StepRollouts(prompts, samples, metrics)

    def close(self) -> None:
        if self.pool is not None:
            if self.pending is not None:
                self.pending.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
