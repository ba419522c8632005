"""GRPO's options against naive references computed here, on a random tiny Llama and a one-rank
gloo group: each option changes the advantages or the loss as its equation says.

- advantageEstimator: grpo, rloo (A_i = r_i - mean_{j≠i} r_j) and reinforce++ (k1 KL in the
  reward on π_old, returns whitened over the batch's tokens, no KL in the loss);
- clipHigh and the three lossAggregation modes, through the minibatch trainer's reported loss
  (two micro-batches, the seq modes divided by the sample count);
- overlongPenalty (DAPO's piecewise shaping, counted in metrics), rolloutCorrection (truncated
  IS weights and their metrics) and logprobTemperature (π_old and π_ref at T, never the
  samples' T = 1 logprobs);
- dynamicSampling: the refill rounds and their bound, a short step that trains on its live
  groups only, a step with none left that makes no update; the feed's refill draws the next
  prompts in order with fresh seeds (synchronous and async) and two ranks keep the same groups.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import save_small_llama
from rlhf_trainer.config import StageConfig
from rlhf_trainer.data.batching import DataStream
from rlhf_trainer.data.readers import PromptRow
from rlhf_trainer.online.experience import collate_samples, policy_logprobs, response_logits
from rlhf_trainer.online.feed import RolloutFeed, StepRollouts
from rlhf_trainer.online.grpo import GRPO
from rlhf_trainer.online.grpo_sampling import (
    gather_scores,
    merge,
    pick_groups,
    refill_count,
    sample_groups,
)
from rlhf_trainer.online.loop import shard
from rlhf_trainer.rollout.client import RolloutError, Sample, Sampling
from rlhf_trainer.runtime.distributed import DistContext

pytestmark = pytest.mark.unit

G, P = 4, 4  # completions per prompt, prompts per step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_llama(tmp_path_factory.mktemp("tiny-llama"))


def reward_of(sample: Sample) -> float:
    """The test's reward: the first response token over 64."""
    return sample.response_ids[0] / 64


def make_grpo(model_dir: Path, ctx: DistContext, hp: dict[str, Any] | None = None,
              sampled_by_policy: bool = False, **options: Any) -> GRPO:  # fmt: skip
    from rlhf_trainer.models.causal_lm import load_causal_lm

    config = StageConfig.model_validate({
        "run": "r", "stage": "grpo", "type": "grpo", "model": {"path": str(model_dir)},
        "dataset": {"path": "prompts.jsonl", "format": "prompts"}, "outputDir": "r/grpo",
        "rewardFunction": "animal_sounds", "grpo": {"numGenerations": G, "rolloutBatchSize": P,
        "maxNewTokens": 8, **options}, "hyperparameters": {"batchSize": P * G, "seed": 3,
        "learningRate": 1e-3, **(hp or {})},
    })  # fmt: skip
    inputs = SimpleNamespace(config=config, model_ref=str(model_dir), reward_model_ref=None,
                             total_steps=2, micro_batch=P * G // 2)  # fmt: skip
    actor, _ = load_causal_lm(config.model, str(model_dir))
    actor.train()
    reward = SimpleNamespace(score=lambda samples, prompts: torch.tensor(
        [reward_of(s) for s in samples]))  # fmt: skip
    setup = SimpleNamespace(inputs=inputs, ctx=ctx, actor=actor, reward=reward, async_=False,
                            sampled_by_policy=sampled_by_policy,
                            tokenizer=SimpleNamespace(pad_token_id=0))  # fmt: skip
    return GRPO(setup)  # type: ignore[arg-type]


def rollouts(seed: int, firsts: Sequence[Sequence[int]], more: Any = None) -> StepRollouts:
    """One group per entry of `firsts` (each sample's first response token), random prompts,
    random lengths 1 to 8 and behaviour logprobs."""
    rng = random.Random(seed)
    samples = []
    for i, group in enumerate(firsts):
        prompt = tuple(rng.randrange(4, 64) for _ in range(rng.randrange(3, 7)))
        for first in group:
            response = (first, *(rng.randrange(4, 64) for _ in range(rng.randrange(0, 8))))
            logprobs = tuple(-rng.uniform(2.0, 5.0) for _ in response)
            samples.append(Sample(i, prompt, response, logprobs, "length"))
    return StepRollouts([f"p{seed}-{i}" for i in range(len(firsts))], samples, more=more)


def spread(seed: int, groups: int = P) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 64) for _ in range(G)] for _ in range(groups)]


def experience(algo: GRPO, step: StepRollouts) -> Any:
    groups = sample_groups(step, algo._rewards, G, P, 0, 1)
    return algo._experience(groups, list(range(P)), torch.ones(P, dtype=torch.bool))


def logprobs_of(model: Any, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return policy_logprobs(model, batch)[0]


def test_group_and_leave_one_out_advantages(model_dir: Path, ctx: DistContext) -> None:
    step = rollouts(1, spread(1))
    r = [reward_of(s) for s in step.samples]
    for estimator in ("grpo", "rloo"):
        exp, _ = experience(make_grpo(model_dir, ctx, advantageEstimator=estimator), step)
        for i in range(P * G):
            group = r[i // G * G : i // G * G + G]
            mean = sum(group) / G
            if estimator == "grpo":
                std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
                want = (r[i] - mean) / (std + 1e-4)
            else:
                want = r[i] - (sum(group) - r[i]) / (G - 1)
            assert float(exp.advantages[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_reinforce_pp_puts_a_k1_kl_in_the_reward_and_whitens_returns(
    model_dir: Path, ctx: DistContext
) -> None:
    algo = make_grpo(model_dir, ctx, advantageEstimator="reinforce++", klCoef=0.1)
    torch.manual_seed(4)
    with torch.no_grad():  # the policy moves away from the reference
        for p in algo.setup.actor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step = rollouts(2, spread(2))
    exp, _ = experience(algo, step)
    assert algo.reference is not None
    old = logprobs_of(algo.setup.actor, exp.batch).tolist()
    ref = logprobs_of(algo.reference, exp.batch).tolist()
    mask = exp.batch.response_mask.tolist()
    returns: list[list[float]] = []
    for b, s in enumerate(step.samples):
        n = len(s.response_ids)
        rewards = [-0.1 * (old[b][t] - ref[b][t]) for t in range(n)]
        rewards[-1] += reward_of(s)
        returns.append([sum(rewards[t:]) for t in range(n)])
    flat = [x for row in returns for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1) + 1e-8)
    for b, row in enumerate(returns):
        for t in range(exp.batch.response_mask.size(1)):
            want = (row[t] - mean) / std if t < len(row) else 0.0
            assert float(exp.advantages[b, t]) == pytest.approx(want, rel=1e-4, abs=1e-5)
    # The KL is in the reward only: the loss at ratio 1 is the bare surrogate, Σ -A over tokens.
    loss, sums = algo._loss(exp)
    surrogate = -sum(float(exp.advantages[b, t]) * mask[b][t] for b in range(len(mask))
                     for t in range(len(mask[0])))  # fmt: skip
    assert float(loss.detach()) == pytest.approx(surrogate, rel=1e-4, abs=1e-5)
    assert sums["kl"] > 1e-4  # a KL the loss would have added


def naive_loss(logp: list[list[float]], old: list[list[float]], adv: list[float],
               lengths: list[int], high: float, mode: str,
               weights: list[list[float]] | None = None) -> float:  # fmt: skip
    """The aggregated clipped-surrogate loss, token by token (ε = 0.2)."""
    per_seq = []
    for b, n in enumerate(lengths):
        tokens = []
        for t in range(n):
            ratio = math.exp(logp[b][t] - old[b][t])
            bounded = min(max(ratio, 0.8), 1.0 + high)
            loss = -min(ratio * adv[b], bounded * adv[b])
            tokens.append(loss * (weights[b][t] if weights else 1.0))
        per_seq.append(tokens)
    if mode == "token-mean":
        return sum(map(sum, per_seq)) / sum(lengths)
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    return sum(map(sum, per_seq)) / (len(per_seq) * 8)  # L_max = maxNewTokens


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_clip_high_and_loss_aggregation(
    model_dir: Path, ctx: DistContext, mode: str, clip_high: float | None
) -> None:
    options: dict[str, Any] = {"lossAggregation": mode}
    if clip_high is not None:
        options["clipHigh"] = clip_high
    algo = make_grpo(model_dir, ctx, **options)
    exp, _ = experience(algo, rollouts(3, spread(3)))
    gen = torch.Generator().manual_seed(5)
    shift = (torch.rand(exp.batch.response_mask.shape, generator=gen) - 0.5) * 0.6
    logp = logprobs_of(algo.setup.actor, exp.batch)
    exp = replace(exp, old_logprobs=(logp - shift) * exp.batch.response_mask)
    ratio, adv = torch.exp(shift), exp.advantages.unsqueeze(-1)
    between = (ratio > 1.2) & (ratio <= 1.28) & (adv > 0) & exp.batch.response_mask.bool()
    assert between.any()  # tokens that clip-higher keeps unclipped
    lengths = [int(n) for n in exp.batch.response_mask.sum(-1)]
    want = naive_loss(logp.tolist(), exp.old_logprobs.tolist(), exp.advantages.tolist(),
                      lengths, clip_high or 0.2, mode)  # fmt: skip
    metrics = algo.trainer.run(exp, algo._loss, random.Random(0), per_sample=algo.per_sample)
    assert metrics["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    default = naive_loss(logp.tolist(), exp.old_logprobs.tolist(), exp.advantages.tolist(),
                         lengths, 0.2, mode)  # fmt: skip
    assert (abs(want - default) > 1e-4) == (clip_high is not None)


def test_overlong_penalty_shapes_rewards_and_is_counted(model_dir: Path, ctx: DistContext) -> None:
    algo = make_grpo(model_dir, ctx, overlongPenalty={"buffer": 4, "factor": 0.5})
    step = rollouts(4, spread(4))
    scores, rewards = algo._rewards(step)
    lengths = [len(s.response_ids) for s in step.samples]
    for score, reward, n in zip(scores.tolist(), rewards.tolist(), lengths, strict=True):
        want = 0.0 if n <= 4 else (4 - n) / 4 * 0.5
        assert reward - score == pytest.approx(want, abs=1e-6)
    metrics, moved = algo.train(0, step)
    assert moved and metrics["overlong_penalised"] == sum(1 for n in lengths if n > 4) > 0
    assert metrics["reward_mean"] == pytest.approx(float(scores.mean()), rel=1e-6)


def test_rollout_correction_weights_each_token(model_dir: Path, ctx: DistContext) -> None:
    algo = make_grpo(model_dir, ctx, rolloutCorrection="tis", rolloutCorrectionCap=1.5)
    step = rollouts(5, spread(5))
    batch = collate_samples(step.samples, 0, ctx.device)
    true = logprobs_of(algo.setup.actor, batch).tolist()
    rng = random.Random(6)
    behaviour = [[true[b][t] - rng.uniform(-0.8, 0.8) for t in range(len(s.response_ids))]
                 for b, s in enumerate(step.samples)]  # fmt: skip
    step = replace(step, samples=[replace(s, logprobs=tuple(behaviour[b]))
                                  for b, s in enumerate(step.samples)])  # fmt: skip
    exp, extra = experience(algo, step)
    assert exp.is_weights is not None
    weights, capped, kl = [], 0, 0.0
    for b, row in enumerate(behaviour):
        w = [min(math.exp(true[b][t] - row[t]), 1.5) for t in range(len(row))]
        capped += sum(1 for t in range(len(row)) if math.exp(true[b][t] - row[t]) > 1.5)
        kl += sum(math.exp(true[b][t] - row[t]) - 1 - (true[b][t] - row[t])
                  for t in range(len(row)))  # fmt: skip
        weights.append(w)
        assert exp.is_weights[b, : len(w)].tolist() == pytest.approx(w, rel=1e-4)
    tokens = sum(map(len, weights))
    assert extra["is_weight"] == pytest.approx(sum(map(sum, weights)) / tokens, rel=1e-4)
    assert extra["is_capped_fraction"] == pytest.approx(capped / tokens) and capped > 0
    assert extra["rollout_mismatch_kl"] == pytest.approx(kl / tokens, rel=1e-3)
    lengths = [len(w) for w in weights]
    want = naive_loss(true, true, exp.advantages.tolist(), lengths, 0.2, "token-mean", weights)
    metrics = algo.trainer.run(exp, algo._loss, random.Random(0))
    assert metrics["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_logprob_temperature_scores_pi_old_and_pi_ref_at_t(
    model_dir: Path, ctx: DistContext
) -> None:
    step = rollouts(6, spread(6))
    hp = {"batchSize": P * G // 2}  # two updates per step: π_old is not the loss pass's own
    plain = make_grpo(model_dir, ctx, hp, sampled_by_policy=True)
    exp, _ = experience(plain, step)
    assert exp.old_logprobs is exp.batch.behaviour_logprobs  # the samples' own, at T = 1
    algo = make_grpo(model_dir, ctx, hp, sampled_by_policy=True, temperature=0.7, klCoef=0.05,
                     logprobTemperature="sampling")  # fmt: skip
    exp, _ = experience(algo, step)
    assert algo.reference is not None
    for model, got in ((algo.setup.actor, exp.old_logprobs), (algo.reference, exp.ref_logprobs)):
        with torch.no_grad():
            logits = response_logits(model, exp.batch).float() / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, exp.batch.responses.unsqueeze(-1))
        mask = exp.batch.response_mask
        assert torch.allclose(got, want.squeeze(-1) * mask, atol=1e-5)
        assert not torch.allclose(got, logprobs_of(model, exp.batch), atol=1e-2)


class Refills:
    """A feed's `more`: round r's groups from `rounds[r]` (first response tokens)."""

    def __init__(self, rounds: list[list[list[int]]]) -> None:
        self.rounds = rounds
        self.asked: list[int] = []

    def __call__(self, count: int) -> StepRollouts:
        self.asked.append(count)
        return rollouts(100 + len(self.asked), self.rounds[len(self.asked) - 1][:count])


EQUAL = [[40] * G, [8] * G, [63] * G, [9] * G]  # groups whose rewards are all equal


def params(module: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_dynamic_sampling_refills_dropped_groups(model_dir: Path, ctx: DistContext) -> None:
    algo = make_grpo(model_dir, ctx, dynamicSampling=True, dynamicSamplingRounds=3)
    refills = Refills([spread(7, 2) + EQUAL[:2], spread(8)])
    first = spread(9)
    first[1], first[3] = EQUAL[0], EQUAL[1]  # 2 of 4 kept: 2 missing at a keep rate of 1/2
    metrics, moved = algo.train(0, rollouts(9, first, more=refills))
    assert refills.asked == [4]  # ceil(2 / (2 / 4)) prompts, one round filled the step
    assert moved and metrics["sampling_rounds"] == 1 and metrics["groups_kept"] == P
    assert metrics["groups_dropped"] == 4


def test_a_short_step_trains_on_its_live_groups_only(model_dir: Path, ctx: DistContext) -> None:
    algo = make_grpo(model_dir, ctx, dynamicSampling=True, dynamicSamplingRounds=1)
    first = [spread(10, 1)[0], *EQUAL[:3]]
    step = rollouts(10, first, more=Refills([EQUAL]))
    metrics, moved = algo.train(0, step)
    assert moved and metrics["groups_kept"] == 1 and metrics["sampling_rounds"] == 1
    assert metrics["groups_dropped"] == 7
    # One update from the sampling policy: ratio 1, so the loss is -Σ A n / Σ n over the group.
    r = [reward_of(s) for s in step.samples[:G]]
    n = [len(s.response_ids) for s in step.samples[:G]]
    mean = sum(r) / G
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
    adv = [(x - mean) / (std + 1e-4) for x in r]
    want = -sum(a * k for a, k in zip(adv, n, strict=True)) / sum(n)
    assert metrics["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_step_with_no_live_group_makes_no_update(
    model_dir: Path, ctx: DistContext, caplog: pytest.LogCaptureFixture
) -> None:
    algo = make_grpo(model_dir, ctx, dynamicSampling=True, dynamicSamplingRounds=2)
    before = params(algo.setup.actor)
    refills = Refills([EQUAL, EQUAL])
    with caplog.at_level(logging.WARNING):
        metrics, moved = algo.train(0, rollouts(11, EQUAL, more=refills))
    assert not moved and refills.asked == [P, P]  # none kept: a full batch each round
    assert metrics["sampling_rounds"] == 2 and metrics["groups_dropped"] == 3 * P
    assert torch.equal(before, params(algo.setup.actor))
    assert "Skipped the update of step 1" in caplog.text


def test_refill_count_merge_and_pick() -> None:
    assert refill_count(missing=2, kept=2, drawn=4, want=4, step=1) == 4
    assert refill_count(missing=1, kept=3, drawn=4, want=8, step=1) == 2
    assert refill_count(missing=3, kept=0, drawn=8, want=8, step=2) == 8
    assert refill_count(missing=1, kept=7, drawn=8, want=8, step=4) == 4  # even shards
    a, b = rollouts(1, spread(1, 2)), rollouts(2, spread(2, 3))
    prompts, samples = merge([a, b])
    assert prompts == a.prompts + b.prompts
    assert [s.prompt_index for s in samples] == [i // G for i in range(5 * G)]
    rewards = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2, 3, 1, 1, 1]).repeat(2)
    chosen, live = pick_groups(rewards, G, 3)  # groups 1, 3, 5 kept in order
    assert chosen == [1, 3, 5] and live.all()
    chosen, live = pick_groups(rewards[:8], G, 3)  # one kept: fillers keep the step's shape
    assert len(chosen) == 2 and live.tolist() == [False, True]


class FakeClient:
    """Rank 0's rollout generator: sample j of prompt "k" answers token 4 + j, or 4 for every
    j when k is not a multiple of 3 (a group with equal rewards). Call `lose` loses a server."""

    def __init__(self, lose: int = -1) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self.lose, self.lost_connection, self.waits = lose, False, 0

    def wait_ready(self) -> None:
        self.waits += 1

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        ks = [int(bytes(p).decode()) for p in prompts]
        self.calls.append((ks, sampling.seed))
        self.lost_connection = len(self.calls) - 1 == self.lose
        if self.lost_connection:
            raise RolloutError("connection reset")
        return [[Sample(i, tuple(p), (4 + (j if ks[i] % 3 == 0 else 0),), (-1.0,), "stop")
                 for j in range(sampling.n)] for i, p in enumerate(prompts)]  # fmt: skip


def make_feed(
    ctx: DistContext, async_: bool = False, lose: int = -1
) -> tuple[RolloutFeed, FakeClient]:
    client = FakeClient(lose)

    def tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    rows = [PromptRow(str(k)) for k in range(40)]
    config = SimpleNamespace(hyperparameters=SimpleNamespace(seed=7))
    syncer = SimpleNamespace(sync=lambda actor, step: {"logprob_mismatch_mean": 0.0})
    setup = SimpleNamespace(
        ctx=ctx, client=client if ctx.is_main else None, tokenizer=tokenizer, max_prompt=8,
        async_=async_, actor=None, syncer=syncer, episodes=None,
        inputs=SimpleNamespace(train_rows=rows, config=config),
    )
    stream = DataStream(40, seed=0, shuffle=False)
    sampling = Sampling(n=2, max_tokens=1, temperature=1.0)
    return RolloutFeed(setup, stream, sampling, 4), client  # type: ignore[arg-type]


def scorer(ctx: DistContext) -> Callable[[StepRollouts], tuple[torch.Tensor, torch.Tensor]]:
    def score(step: StepRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        mine = shard(step.samples, ctx)  # each rank scores its share, as GRPO does
        everyone = gather_scores(torch.tensor([float(s.response_ids[0]) for s in mine]))
        return everyone, everyone

    return score


def test_the_feed_refills_with_the_next_prompts(ctx: DistContext) -> None:
    feed, client = make_feed(ctx)
    groups = sample_groups(feed.next(0, prefetch=False), scorer(ctx), 2, 4, 3, 1)
    prompts = [int(p) for p in groups.prompts]
    assert prompts == list(range(11)) and groups.rounds == 2  # kept: 0 3 | 6 | 9
    assert pick_groups(groups.rewards, 2, 4)[0] == [0, 3, 6, 9]
    assert [seed for _, seed in client.calls] == [7, 7 + 4, 7 + 8]  # seed + prompt offset
    assert feed.position() == (0, 11)  # a resume starts after the refills
    assert [int(p) for p in feed.next(1, prefetch=False).prompts] == [11, 12, 13, 14]


def test_a_refill_that_loses_a_server_is_generated_again(ctx: DistContext) -> None:
    feed, client = make_feed(ctx, lose=1)  # the first refill's call
    step = feed.next(0, prefetch=False)
    assert step.more is not None
    extra = step.more(3)
    assert [int(p) for p in extra.prompts] == [4, 5, 6]  # the same prompts, rewound
    assert client.calls[1:] == [([4, 5, 6], 7 + 4)] * 2 and client.waits == 1
    assert extra.metrics["rollout_recoveries"] == 1
    assert feed.position() == (0, 7)


def test_an_async_refill_comes_after_the_batch_in_flight(ctx: DistContext) -> None:
    feed, client = make_feed(ctx, async_=True)
    try:
        step = feed.next(0, prefetch=True)  # step 1's batch is generating now
        assert step.more is not None
        extra = step.more(2)
        assert [int(p) for p in extra.prompts] == [8, 9]
        assert client.calls[2] == ([8, 9], 7 + 4)  # seeded after the step's 4 prompts
        assert feed.position() == (0, 4)  # a resume regenerates step 1's batch
        assert [int(p) for p in feed.next(1, prefetch=False).prompts] == [4, 5, 6, 7]
    finally:
        feed.close()


def _two_ranks(rank: int, port: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = DistContext(rank, 2, rank, torch.device("cpu"), False)
        feed, _ = make_feed(ctx)
        groups = sample_groups(feed.next(0, prefetch=False), scorer(ctx), 2, 4, 3, 2)
        chosen, live = pick_groups(groups.rewards, 2, 4)
        out[rank] = (groups.prompts, groups.rewards.tolist(), chosen, live.tolist())
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_the_same_groups() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = mp.Manager().dict()
    mp.spawn(_two_ranks, args=(port, out), nprocs=2, join=True)
    assert out[0] == out[1]
    assert out[0][2] == [0, 3, 6, 9] and all(out[0][3])
