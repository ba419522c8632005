"""Online RRHF's loss inputs from sampled groups, and minibatches that keep a query's k
responses together (the `unit` of `MinibatchTrainer`), on a 1-rank gloo group. The 2-rank
run of the whole stage is in tests/integration/test_online_vllm.py."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from helpers import minibatch_setup
from rlhf_trainer.algos.losses import rrhf_loss
from rlhf_trainer.online.experience import Batch, Experience
from rlhf_trainer.online.rrhf import ranking_inputs
from rlhf_trainer.online.steps import MinibatchTrainer
from rlhf_trainer.runtime.distributed import DistContext, shard_model

pytestmark = pytest.mark.unit


def sampled_groups(
    queries: int, k: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token logprobs (garbage past each response, as padding may hold), the response mask
    and rewards of `queries` x `k` samples of lengths 1..width."""
    g = torch.Generator().manual_seed(seed)
    n = queries * k
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    logprobs = -torch.rand(n, width, generator=g) * 3
    rewards = torch.randint(0, 3, (n,), generator=g).float()  # ties happen
    return logprobs, mask, rewards


def naive_rrhf(
    logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, k: int, penalty: float
) -> tuple[list[float], list[float]]:
    """RRHF per query written out sample by sample (Yuan et al. 2023, docs/ALGORITHMS.md)."""
    ranks, sfts = [], []
    for q in range(rewards.numel() // k):
        rows = range(q * k, (q + 1) * k)
        logp = {
            i: sum(float(logprobs[i, t]) for t in range(mask.size(1)) if mask[i, t]) for i in rows
        }
        length = {i: float(mask[i].sum()) for i in rows}
        p = {i: logp[i] / length[i] ** penalty for i in rows}
        ranks.append(
            sum(max(0.0, p[i] - p[j]) for i in rows for j in rows if rewards[i] < rewards[j])
        )
        best = max(rows, key=lambda i: (float(rewards[i]), -i))  # the first best on a tie
        sfts.append(-logp[best] / length[best])
    return ranks, sfts


@pytest.mark.parametrize(("k", "penalty"), [(2, 1.0), (4, 1.0), (5, 0.5)])
def test_ranking_inputs_and_loss_match_a_per_sample_loop(k: int, penalty: float) -> None:
    logprobs, mask, rewards = sampled_groups(queries=6, k=k, width=7, seed=k)
    logps, lengths, by_query = ranking_inputs(logprobs, mask, rewards, k)
    assert logps.shape == lengths.shape == by_query.shape == (6, k)
    assert by_query[1].tolist() == rewards[k : 2 * k].tolist()  # query-major, k consecutive
    assert lengths.flatten().tolist() == mask.sum(dim=1).tolist()
    out = rrhf_loss(logps, lengths, by_query, length_penalty=penalty)
    ranks, sfts = naive_rrhf(logprobs, mask, rewards, k, penalty)
    torch.testing.assert_close(out.rank, torch.tensor(ranks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sft, torch.tensor(sfts), rtol=1e-5, atol=1e-5)


def test_the_gradient_ranks_the_better_response_up() -> None:
    """Two responses, the better-rewarded one less likely: the rank loss is positive and one
    step of its gradient raises the better response's score above the worse one's."""
    logprobs = torch.tensor([[-1.0, -1.0], [-3.0, -3.0]], requires_grad=True)
    mask = torch.ones(2, 2)
    rewards = torch.tensor([0.0, 1.0])
    logps, lengths, by_query = ranking_inputs(logprobs, mask, rewards, 2)
    out = rrhf_loss(logps, lengths, by_query)
    assert float(out.rank.detach()[0]) == pytest.approx(2.0)  # p_worse - p_better = -1 - (-3)
    (out.rank.sum() + out.sft.sum()).backward()
    assert logprobs.grad is not None
    stepped = logprobs.detach() - 2.0 * logprobs.grad
    assert stepped[1].mean() > stepped[0].mean()


def experience(ids: torch.Tensor) -> Experience:
    """Samples whose `scores` hold their own index (to see which rows a loss call gets)."""
    n = ids.numel()
    batch = Batch(
        sequences=torch.zeros(n, 3, dtype=torch.long),
        attention_mask=torch.ones(n, 3, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        behaviour_logprobs=torch.zeros(n, 2),
    )
    return Experience(batch, torch.zeros(n, 2), torch.zeros(n), ids.float())


def test_minibatches_keep_each_querys_responses_together(ctx: DistContext) -> None:
    k, queries = 4, 6
    model = shard_model(nn.Linear(1, 1), bf16=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    trainer = MinibatchTrainer(minibatch_setup(ctx, 1, batchSize=2, gradClip=0.0), model, optimizer,
                               scheduler)
    seen: list[list[int]] = []

    def loss(exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [int(i) for i in exp.scores.tolist()]
        seen.append(rows)
        weight: Any = model.weight  # a plain Parameter: one process in float32 is not sharded
        # One per query, plus a zero term so the backward reaches the parameter.
        return weight.sum() * 0 + len(rows) / k, {"queries": len(rows) / k}

    metrics = trainer.run(experience(torch.arange(queries * k)), loss, random.Random(0), unit=k)
    assert len(seen) == queries  # micro-batches of one query
    assert sorted(rows[0] // k for rows in seen) == list(range(queries))
    for rows in seen:
        assert rows == list(range(rows[0], rows[0] + k)) and rows[0] % k == 0
    assert [rows[0] // k for rows in seen] != list(range(queries))  # shuffled by query
    # Means over the minibatch's queries, not its tokens.
    assert metrics["loss"] == pytest.approx(1.0) and metrics["queries"] == pytest.approx(1.0)
