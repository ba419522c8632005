"""Optimisation over one step's experience, shared by PPO (actor and critic) and GRPO.

Each rank holds its share of the step's samples. A minibatch is `batchSize` samples over all
ranks (`batchSize / worldSize` from each), run as `gradientAccumulation` micro-batches; its
loss is summed over tokens and divided by the active tokens of the whole minibatch (all
ranks), so the update does not depend on how many ranks share the work (`loop.py`).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR

from rlhf_trainer.algos.policy_losses import truncated_is_weights
from rlhf_trainer.config import PolicyGradientOptions
from rlhf_trainer.online.experience import (
    Batch,
    Experience,
    in_chunks,
    slice_batch,
    tempered_and_raw_logprobs,
)
from rlhf_trainer.runtime.distributed import DistContext, all_reduce_sum
from rlhf_trainer.runtime.memory import check_step_fits
from rlhf_trainer.training.loop import backward_rank_micro_batches, grad_norm_and_clip

if TYPE_CHECKING:
    from rlhf_trainer.online.setup import OnlineSetup

# A micro-batch's (summed loss to backpropagate, summed diagnostics).
LossFn = Callable[[Experience], tuple[torch.Tensor, dict[str, float]]]
A = TypeVar("A")
B = TypeVar("B")


def correction_on(opts: PolicyGradientOptions, async_: bool) -> bool:
    """Whether each token's policy loss takes the truncated IS weight min(π_old / π_rollout, C)
    (`rolloutCorrection`): always with `tis`, never with `none`, with `async: true` for `auto`
    (the samples then come from last step's weights on the servers)."""
    if opts.rollout_correction == "auto":
        return async_
    return opts.rollout_correction == "tis"


def scoring_temperature(opts: PolicyGradientOptions) -> float:
    """The T that logits are divided by before the log-softmax of every policy and reference
    pass: the sampling temperature with `logprobTemperature: sampling`, else 1."""
    if opts.logprob_temperature == "sampling":
        return float(getattr(opts, "temperature", 1.0))
    return 1.0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset sets)."""
    return len(os.sched_getaffinity(0))


def concurrent_updates(
    ctx: DistContext, models: list[nn.Module], threads: int, cpus: int | None = None
) -> bool:
    """Whether two models' updates (PPO's critic and actor) may run at once, on two threads of
    this process. Only when the resources allow it:

    - unsharded models (one process in float32): FSDP2 modules updated from two threads
      cross their collectives in gloo even on process groups of their own (docs/DESIGN.md);
    - CPU training with cores for both: each thread's ops use `threads` cores, so two need
      2 x `threads` (with fewer they wait on each other's parked threads, as in `async`
      overlap). On a GPU the two would share one device and stream; not built."""
    if ctx.world_size != 1 or ctx.device.type != "cpu":
        return False
    if any(isinstance(m, FSDPModule) for m in models):
        return False
    return (usable_cpus() if cpus is None else cpus) >= 2 * threads


def run_both(first: Callable[[], A], second: Callable[[], B], concurrent: bool) -> tuple[A, B]:
    """`first()` and `second()`, on a thread of its own for `first` when `concurrent` (they
    must share no state but what they only read); an exception in either is raised here."""
    if not concurrent:
        return first(), second()
    with ThreadPoolExecutor(1, thread_name_prefix="concurrent-update") as pool:
        future = pool.submit(first)
        out = second()
        return future.result(), out


def forward_in_chunks(
    setup: OnlineSetup, batch: Batch, fn: Callable[[Batch], torch.Tensor]
) -> torch.Tensor:
    """`fn` (a no-grad forward) over the batch in micro-batch-sized chunks, concatenated."""
    return in_chunks(
        batch.sequences.size(0),
        setup.inputs.micro_batch,
        lambda rows: fn(slice_batch(batch, rows)).detach(),
    )


def corrected_old_logprobs(
    setup: OnlineSetup, batch: Batch, temperature: float, cap: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """log π_old (B, R) from a forward pass of the policy at `temperature`, the truncated IS
    weights min(π_old / π_rollout, cap) (B, R) against the samples' own logprobs, and their
    per-token means over all ranks (`is_weight`, `is_capped_fraction`, `rollout_mismatch_kl`).
    The weights compare the policy's logprobs at T = 1 with the engine's, the only temperature
    the engines report (one forward pass gives both). Collective."""
    actor = setup.actor
    both = forward_in_chunks(
        setup, batch, lambda b: tempered_and_raw_logprobs(actor, b, temperature)
    )
    old, at_one, mask = both[..., 0], both[..., 1], batch.response_mask
    weights, sums = truncated_is_weights(at_one, batch.behaviour_logprobs, mask, cap)
    keys = ("is_weight", "is_capped", "rollout_mismatch_kl")
    totals = all_reduce_sum([float(sums[k]) for k in keys] + [float(mask.sum())], old.device)
    tokens = max(totals[-1], 1.0)
    names = ("is_weight", "is_capped_fraction", "rollout_mismatch_kl")
    return old, weights, {n: v / tokens for n, v in zip(names, totals[:3], strict=True)}


def global_mean_std(x: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean and std (Bessel) of a 1-D tensor split over ranks. Collective."""
    x64 = x.double()
    total, squares, n = all_reduce_sum(
        [float(x64.sum()), float((x64 * x64).sum()), float(x64.numel())], device
    )
    mean = total / max(n, 1.0)
    var = (squares - n * mean * mean) / max(n - 1.0, 1.0)
    return mean, max(var, 0.0) ** 0.5


def rank_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous block of rows of a tensor over all of a step's samples."""
    per = x.size(0) // ctx.world_size
    return x[ctx.rank * per : (ctx.rank + 1) * per]


def rename(metrics: dict[str, float]) -> dict[str, float]:
    """Diagnostic sums to their metrics.jsonl names (docs/METRICS.md)."""
    names = {"clipped": "clip_fraction"}
    return {names.get(k, k): v for k, v in metrics.items()}


class ActorOnly:
    """What an algorithm that trains the actor alone, with one optimizer (GRPO, online RRHF),
    gives the step loop besides `train`: its modules, optimizers and checkpointed state."""

    setup: OnlineSetup
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR

    def modules(self) -> nn.Module:
        return self.setup.actor

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


def check_fits(setup: OnlineSetup, models: Sequence[nn.Module]) -> None:
    """Before the first step: the trained models' gradients, optimizer state and a micro-batch
    of `maxLength` sequences fit in the free memory (`runtime.memory`)."""
    inputs, ctx = setup.inputs, setup.ctx
    hp = inputs.config.hyperparameters
    check_step_fits(models, hp, inputs.micro_batch, ctx.world_size, ctx.device, ctx.bf16)


class MinibatchTrainer:
    """Optimizer steps of one model over a step's experience."""

    def __init__(
        self,
        setup: OnlineSetup,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
    ) -> None:
        self.setup, self.model = setup, model
        self.optimizer, self.scheduler = optimizer, scheduler

    def run(
        self,
        exp: Experience,
        loss_fn: LossFn,
        rng: random.Random,
        epochs: int = 1,
        unit: int = 1,
        per_sample: bool = False,
    ) -> dict[str, float]:
        """`epochs` passes over `exp` in shuffled minibatches; per-token means of the loss and
        of every diagnostic `loss_fn` sums, averaged over the optimizer steps.

        With `unit` > 1, runs of `unit` consecutive samples (RRHF's k responses to a query)
        stay together: they are shuffled and batched whole, batchSize and the micro-batch count
        them, and the means are over the minibatch's units instead of its tokens.

        With `per_sample`, the loss and every diagnostic are divided by the minibatch's number
        of samples (all ranks) instead of its response tokens: `loss_fn` then returns sums of
        per-sample quantities (GRPO's seq-mean loss aggregations), and its diagnostics must be
        per-sample sums too (a token sum would come out as a per-sample total)."""
        setup = self.setup
        ctx, hp = setup.ctx, setup.inputs.config.hyperparameters
        local = exp.batch.sequences.size(0) // unit
        per_minibatch = hp.batch_size // ctx.world_size
        micro = setup.inputs.micro_batch
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(epochs):
            order = list(range(local))
            rng.shuffle(order)
            for start in range(0, local, per_minibatch):
                units = order[start : start + per_minibatch]
                sub = exp.select([u * unit + j for u in units for j in range(unit)])
                count = _count(sub, len(units), unit, per_sample)
                denominator = all_reduce_sum([count], ctx.device)[0]
                chunks = [
                    list(range(i * unit, (i + micro) * unit))
                    for i in range(0, per_minibatch, micro)
                ]
                sums = backward_rank_micro_batches(
                    self.model,
                    chunks,
                    ctx,
                    lambda rows, sub=sub: loss_fn(sub.select(rows)),  # type: ignore[misc]
                    1.0 / max(denominator, 1.0),
                )
                learning_rate = float(self.scheduler.get_last_lr()[0])
                norm = grad_norm_and_clip(self.model, hp.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                means = {k: v / max(denominator, 1.0) for k, v in sums.items()}
                means |= {"grad_norm": norm, "learning_rate": learning_rate}
                for key, value in means.items():
                    totals[key] = totals.get(key, 0.0) + value
                steps += 1
        return {k: v / max(steps, 1) for k, v in totals.items()}


def _count(sub: Experience, units: int, unit: int, per_sample: bool) -> float:
    """What a rank's share of a minibatch adds to the loss's denominator: its samples that
    hold a response token with `per_sample` (`aggregate_loss`'s sequences; a group that dynamic
    sampling dropped has an empty mask), its units when `unit` > 1, else its response tokens."""
    if per_sample:
        return float((sub.batch.response_mask.sum(dim=-1) > 0).sum())
    if unit > 1:
        return float(units)
    return float(sub.batch.response_mask.sum())
