"""Rollouts for each step: prompts in order, generated on the servers by rank 0, broadcast.

Synchronous by default: step t's prompts are generated with the weights the servers hold
after step t-1's sync. With `async: true`, step t+1's prompts are generated in a background
thread while step t trains (on the weights of step t), so each batch is one step off-policy;
the algorithms then take the importance ratio against the servers' behaviour logprobs.

A rollout server that goes away (its pod or process restarted) costs no step: when a batch
lost a connection, whether or not the retries then got through, the servers may have come back
with their start-up weights. Rank 0 waits until every server is ready again
(`rollout.startupTimeoutSeconds`), every rank re-syncs the current policy's weights and runs
the parity probe, and the same prompts are generated again (the prompt position is rewound),
so the step is neither lost nor counted twice. At most `MAX_RECOVERIES` times per step.

A step may ask for more prompts after its batch (`StepRollouts.more`, GRPO's dynamic sampling):
the next prompts of the order, sampled from the same weights with seeds after the batch's. In
synchronous mode the recorded position moves past them, so a resume continues exactly. With
`async: true` the next step's batch is already being generated from the prompts after this
one's: the generation finishes first, the extra prompts come after that batch, and the recorded
position stays before it (a resume regenerates that batch; the extra prompts may come up once
more later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

from rlhf_trainer.data.batching import DataStream, prompt_token_ids
from rlhf_trainer.rollout.client import RolloutError, Sample, Sampling
from rlhf_trainer.runtime.distributed import broadcast_object

if TYPE_CHECKING:
    from rlhf_trainer.online.setup import OnlineSetup

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003  # per-step seed offset; prompts within a step add their index
MAX_RECOVERIES = 3  # server losses survived within one step


class ServersLost(RolloutError):
    """A batch lost a connection to a rollout server, which may have restarted since."""


@dataclass(frozen=True)
class StepRollouts:
    """One step's prompts and samples, `n` per prompt, prompt-major."""

    prompts: list[str]
    samples: list[Sample]  # prompt i's samples at [i * n, (i + 1) * n); Sample.prompt_index = i
    metrics: dict[str, float] = field(default_factory=dict)
    # Collective: the rollouts of `count` further prompts for the same step, from the same
    # weights (dynamic sampling's refill). None where no feed stands behind these rollouts.
    more: Callable[[int], StepRollouts] | None = field(default=None, compare=False, repr=False)


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
        self.recoveries = 0  # server losses survived over the run
        self.drawn = 0  # prompts the current step has had (its batch and any refills)

    def seek(self, epoch: int, index: int) -> None:
        self.stream = self.stream.at(epoch, index)
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
        out = self._collective(step, lambda attempt: self._take(step, prefetch and attempt == 0))
        self.drawn = self.per_step
        return replace(out, more=lambda count: self.more(step, count))

    def more(self, step: int, count: int) -> StepRollouts:
        """The rollouts of `count` further prompts for `step` (collective): the next ones of the
        prompt order, seeded after the step's other prompts (module docstring for async)."""
        offset, self.drawn = self.drawn, self.drawn + count
        return self._collective(step, lambda attempt: self._take_more(step, count, offset))

    def _collective(
        self, step: int, take: Callable[[int], tuple[StepRollouts | None, str | None]]
    ) -> StepRollouts:
        """Rank 0 takes rollouts (`take(attempt)`), every rank gets them; a lost server is
        waited for, re-synced and probed, and `take` tried again."""
        recovered: dict[str, float] = {}
        for attempt in range(MAX_RECOVERIES + 1):
            out: StepRollouts | None = None
            lost: str | None = None
            if self.setup.ctx.is_main:
                out, lost = take(attempt)
            lost = cast(str | None, broadcast_object(lost))
            if lost is None:
                break
            if attempt == MAX_RECOVERIES:
                raise RolloutError(
                    f"lost the rollout servers {MAX_RECOVERIES + 1} times in step {step + 1}: "
                    f"{lost}; check their pods (OOMKilled? evicted?) and logs"
                )
            recovered = self._recover(step, lost)
        out = cast(StepRollouts, broadcast_object(out))
        self.trained = cast(tuple[int, int], broadcast_object(self.trained))
        out.metrics.update(recovered)
        return out

    def _take(self, step: int, prefetch: bool) -> tuple[StepRollouts | None, str | None]:
        """Rank 0: this step's rollouts, or why the servers were lost (the prompts rewound)."""
        try:
            out = self.pending.result() if self.pending is not None else self._generate(step)
        except ServersLost as err:
            self.pending = None
            self.stream = self.stream.at(*self.trained)
            assert self.setup.client is not None
            self.setup.client.wait_ready()  # as long as rollout.startupTimeoutSeconds
            return None, str(err)
        self.pending = None
        self.trained = (self.stream.epoch, self.stream.index)
        if self.pool is not None and prefetch:
            self.pending = self.pool.submit(self._generate, step + 1)
        return out, None

    def _take_more(
        self, step: int, count: int, offset: int
    ) -> tuple[StepRollouts | None, str | None]:
        """Rank 0: `count` further prompts' rollouts, or why the servers were lost (the prompts
        rewound). Waits for the generation in flight first: both draw from the prompt order."""
        self.settle()
        start = (self.stream.epoch, self.stream.index)
        try:
            out = self._generate(step, count, offset)
        except ServersLost as err:
            self.stream = self.stream.at(*start)
            assert self.setup.client is not None
            self.setup.client.wait_ready()
            return None, str(err)
        if self.pool is None:  # nothing generated past them: a resume starts after them
            self.trained = (self.stream.epoch, self.stream.index)
        return out, None

    def _recover(self, step: int, lost: str) -> dict[str, float]:
        """Collective: the servers answer again; give them the policy's weights and probe."""
        self.recoveries += 1
        log.warning(
            "Lost a rollout server during step %d (%s); it answers again, so re-syncing the "
            "weights and generating the step again",
            step + 1,
            lost,
        )
        synced = self.setup.syncer.sync(self.setup.actor, step)  # WeightSyncError on a mismatch
        return {
            "rollout_recoveries": float(self.recoveries),
            "recovery_logprob_mismatch_mean": synced["logprob_mismatch_mean"],
        }

    def settle(self) -> None:
        """Wait for the generation in flight (a weight sync must not overlap it)."""
        if self.pending is not None:
            wait_futures([self.pending])

    def _generate(self, step: int, count: int | None = None, offset: int = 0) -> StepRollouts:
        """Rank 0: the next `count` prompts (the step's batch when None) on the servers; each
        prompt's seed is the step's plus its place among the step's prompts (`offset` + i)."""
        setup = self.setup
        assert setup.client is not None
        indices = self.stream.next_batch(self.per_step if count is None else count)
        rows = [setup.inputs.train_rows[i] for i in indices]
        seed = setup.inputs.config.hyperparameters.seed + step * SEED_STRIDE + offset
        sampling = replace(self.sampling, seed=seed)
        started = time.perf_counter()
        try:
            if setup.episodes is not None:  # multi-turn, against the stage's environment
                records = [row.record or {"prompt": row.prompt} for row in rows]
                prompts, samples, extra = setup.episodes.play(
                    records, seed, sampling.n, setup.client, sampling
                )
            else:
                prompts, extra = [row.prompt for row in rows], {}
                ids = prompt_token_ids(setup.tokenizer, rows, setup.max_prompt)
                samples = [s for group in setup.client.generate(ids, sampling) for s in group]
        except RolloutError as err:
            if setup.client.lost_connection:
                raise ServersLost(str(err)) from None
            raise
        if setup.client.lost_connection:  # retried through, maybe to a restarted server
            raise ServersLost("a connection dropped and a retry got through")
        seconds = time.perf_counter() - started
        tokens = sum(len(s.response_ids) for s in samples)
        truncated = sum(1 for s in samples if s.finish_reason == "length")
        metrics = {
            "generate_s": seconds,
            "generate_tokens_per_s": tokens / max(seconds, 1e-9),
            "response_length": tokens / max(len(samples), 1),
            "truncated_fraction": truncated / max(len(samples), 1),
        }
        return StepRollouts(prompts, samples, metrics | extra)

    def close(self) -> None:
        if self.pool is not None:
            if self.pending is not None:
                self.pending.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)
