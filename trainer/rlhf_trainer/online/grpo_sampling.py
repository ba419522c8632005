"""A GRPO step's groups: its rollouts scored on every rank, and DAPO's dynamic sampling.

Dynamic sampling (Yu et al. 2025, "DAPO", section 3.2: the objective's constraint
0 < |{o_i : is_equivalent(a, o_i)}| < G; verl `filter_groups`): a group whose G rewards are all
equal has every group-relative advantage 0 and carries no policy gradient, so it is dropped
and more prompts are sampled until the step has `rolloutBatchSize` groups with a spread:

1. every rank scores its share of a round's samples and all-gathers the rewards, so each rank
   decides on the same rewards (`advantages.group_all_equal`) and keeps the same groups;
2. while fewer than P = `rolloutBatchSize` groups are kept and fewer than
   `dynamicSamplingRounds` extra rounds ran, the feed samples the next prompts of the order
   (`StepRollouts.more`, collective: rank 0 generates on the servers or the trainer's engine
   and broadcasts). A round asks for the missing groups divided by the share kept so far,
   at most P, rounded up so its samples shard evenly over the ranks;
3. the step trains on the first P kept groups in sampling order. When the rounds run out
   short, the remaining slots hold dropped groups with their response mask zeroed, so the
   step keeps its shape (every rank runs the same micro-batches) while only the kept groups
   enter the advantages (the batch std of `scaleRewards: batch`, reinforce++'s whitening),
   the loss and its token count; with none kept the step makes no update.

With `async: true` a refill waits for the next step's batch, in flight, to finish first (both
draw from the prompt order; `online/feed.py`), so a step that refills loses its overlap.
reinforce++'s baseline is the batch's, so there a group of equal rewards does carry a gradient;
the filter then only keeps the step's prompts informative, as DAPO's does for any estimator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from rlhf_trainer.algos.advantages import group_all_equal
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.rollout.client import Sample

# A round's (raw scores, shaped rewards) of all its samples, all ranks', in sample order.
RewardFn = Callable[[StepRollouts], tuple[torch.Tensor, torch.Tensor]]


def gather_scores(local: torch.Tensor) -> torch.Tensor:
    """Every rank's scores in rank order (collective): (B,) -> (world * B,)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


@dataclass(frozen=True)
class StepGroups:
    """A step's rollouts over all its sampling rounds, G per prompt, prompt-major."""

    prompts: list[str]
    samples: list[Sample]  # group i at [i * G, (i + 1) * G); prompt_index into `prompts`
    scores: torch.Tensor  # (N,) float32: the reward source's scores
    rewards: torch.Tensor  # (N,) float32: what the advantages use (overlong penalty added)
    rounds: int = 0  # extra sampling rounds taken
    metrics: dict[str, float] = field(default_factory=dict)  # the rounds' generation metrics


def merge(parts: Sequence[StepRollouts]) -> tuple[list[str], list[Sample]]:
    """Rounds' rollouts as one list of prompts and samples (prompt indices renumbered)."""
    prompts: list[str] = []
    samples: list[Sample] = []
    for part in parts:
        offset = len(prompts)
        prompts.extend(part.prompts)
        samples.extend(replace(s, prompt_index=s.prompt_index + offset) for s in part.samples)
    return prompts, samples


def merged_metrics(parts: Sequence[StepRollouts]) -> dict[str, float]:
    """The first round's generation metrics, with every round's generation time and the
    latest recovery counts."""
    out = dict(parts[0].metrics)
    for part in parts[1:]:
        for key, value in part.metrics.items():
            if key == "generate_s":
                out[key] = out.get(key, 0.0) + value
            elif key.startswith(("rollout_recoveries", "recovery_")):
                out[key] = value
    return out


def refill_count(missing: int, kept: int, drawn: int, want: int, step: int) -> int:
    """Prompts for the next round: `missing` groups at the share kept so far (`kept` of
    `drawn`; a full batch when none was kept), at most `want`, rounded up to a multiple of
    `step` (the prompts whose samples split evenly over the ranks; `want` is one)."""
    count = want if kept == 0 else min(math.ceil(missing * drawn / kept), want)
    return min(math.ceil(count / step) * step, want)


def sample_groups(
    first: StepRollouts, reward: RewardFn, group: int, want: int, rounds: int, world: int
) -> StepGroups:
    """The step's groups: `first` alone when `rounds` is 0 or no feed can give more, else more
    rounds until `want` groups have unequal rewards or `rounds` extra rounds ran (collective;
    every rank gets the same)."""
    parts = [first]
    scored = [reward(first)]
    step = world // math.gcd(group, world)
    while len(parts) <= rounds and first.more is not None:
        useful = ~torch.cat([group_all_equal(r, group) for _, r in scored])
        kept = int(useful.sum())
        if kept >= want:
            break
        count = refill_count(want - kept, kept, useful.numel(), want, step)
        parts.append(first.more(count))
        scored.append(reward(parts[-1]))
    prompts, samples = merge(parts)
    scores = torch.cat([s for s, _ in scored])
    rewards = torch.cat([r for _, r in scored])
    return StepGroups(prompts, samples, scores, rewards, len(parts) - 1, merged_metrics(parts))


def pick_groups(rewards: torch.Tensor, group: int, want: int) -> tuple[list[int], torch.Tensor]:
    """The `want` groups a step trains on, in sampling order, and which of them are live:
    the first `want` with unequal rewards, then, when there are fewer, dropped ones (not live)
    to keep the step's shape. rewards: (N,) of N / G groups. Returns (group indices,
    (want,) bool)."""
    equal = group_all_equal(rewards, group).tolist()
    kept = [i for i, same in enumerate(equal) if not same][:want]
    fillers = [i for i, same in enumerate(equal) if same][: want - len(kept)]
    chosen = sorted(kept + fillers)
    live = torch.tensor([not equal[i] for i in chosen], dtype=torch.bool)
    return chosen, live
