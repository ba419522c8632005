"""PPO's update schedule within a step: which of its two models update, in what order, and
where the critic's values at sampling time come from. `PPO.train` asks it, so that the
algorithm reads experience -> critic -> advantages -> actor.

- Folded values: with one critic update on the whole batch (one minibatch, one epoch) the
  critic's values at sampling time are those of the critic about to update, so its update pass
  gives them (detached) and no forward pass of its own runs; the actor then waits for the
  critic, whose values its advantages need.
- Critic warm-up (`ppo.criticWarmupSteps`): the first steps update the critic alone.
- Concurrent updates: the critic and the actor share nothing but the experience, which both
  only read, so they update at once where the resources allow it
  (`steps.concurrent_updates`: one unsharded CPU process with cores for both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rlhf_trainer.online.steps import concurrent_updates, run_both, usable_cpus
from rlhf_trainer.runtime.distributed import DistContext

log = logging.getLogger(__name__)

Metrics = dict[str, float]


@dataclass(frozen=True)
class UpdateSchedule:
    fold_values: bool  # the critic's one update of the step gives its values at sampling time
    concurrent: bool  # the critic and the actor update at once
    warmup_steps: int  # steps in which the critic alone updates

    @classmethod
    def plan(
        cls,
        ctx: DistContext,
        models: tuple[nn.Module, nn.Module],
        critic_updates_per_step: int,
        warmup_steps: int,
    ) -> UpdateSchedule:
        """The schedule for the actor and critic `models` on this process."""
        threads = torch.get_num_threads()
        concurrent = concurrent_updates(ctx, list(models), threads)
        if concurrent:
            log.info("The critic and the actor update concurrently (one process, %d CPUs for "
                     "2 x %d torch threads)", usable_cpus(), threads)  # fmt: skip
        fold = critic_updates_per_step == 1 and not concurrent
        return cls(fold_values=fold, concurrent=concurrent, warmup_steps=warmup_steps)

    def actor_moves(self, step: int) -> bool:
        return step >= self.warmup_steps

    def update(
        self,
        step: int,
        critic: Callable[[], Metrics],
        actor: Callable[[], Metrics],
        folded: Metrics | None,
    ) -> tuple[Metrics, Metrics | None]:
        """Run the step's updates: (the critic's metrics, the actor's or None during the
        critic's warm-up). `folded`: the critic's update already ran, folding its values."""
        moves = self.actor_moves(step)
        if folded is not None:
            return folded, actor() if moves else None
        if moves:
            return run_both(critic, actor, self.concurrent)
        return critic(), None
