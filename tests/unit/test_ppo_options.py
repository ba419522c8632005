"""PPO's options of issue 25 as wired into the stage (`online/ppo.py`, `online/steps.py`,
`online/experience.py`, `models/online_models.py`), against naive references written out token
by token:
policyClipHigh, dualClip, klEstimator, rolloutCorrection (truncated IS), logprobTemperature,
the ppo-max preset; the warning on a step of equal rewards; ptx examples disjoint across
ranks; dropout off in every online model; MinibatchTrainer's per-sample denominator.

The math itself (`policy_losses`, `rewards`) has its own tests; these check what the wiring
adds: which logprobs reach which function, at which temperature, with which weights. On a
1-rank gloo group with a random tiny Llama."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from helpers import minibatch_setup
from rlhf_trainer.config import PPO_MAX_PRESET, GRPOOptions, PPOOptions, StageConfig
from rlhf_trainer.data.batching import Example
from rlhf_trainer.online.experience import (
    Batch,
    Experience,
    collate_samples,
    critic_values,
    policy_logprobs,
    position_ids,
    tempered_and_raw_logprobs,
)
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.online.ppo import PPO, PtxSource
from rlhf_trainer.online.steps import MinibatchTrainer, correction_on, scoring_temperature
from rlhf_trainer.rollout.client import Sample
from rlhf_trainer.runtime.distributed import DistContext
from rlhf_trainer.training.loop import build_optimizer

pytestmark = pytest.mark.unit

N = 8  # samples per step
CPU = torch.device("cpu")


def tiny_llama(out: Path, **config: Any) -> Path:
    import transformers

    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     **config)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(llama).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def stage(model_dir: Path, options: dict[str, Any]) -> StageConfig:
    return StageConfig.model_validate({
        "run": "r", "stage": "ppo", "type": "ppo", "model": {"path": str(model_dir)},
        "dataset": {"path": "prompts.jsonl", "format": "prompts"}, "outputDir": "r/ppo",
        "rewardFunction": "animal_sounds", "hyperparameters": {"batchSize": N, "seed": 3,
        "learningRate": 1e-3}, "ppo": {"rolloutBatchSize": N, "criticLearningRate": 1e-3,
        "klCoef": 0.05, **options},
    })  # fmt: skip


def build(model_dir: Path, ctx: DistContext, options: dict[str, Any] | None = None, *,
          sampled_by_policy: bool = False, async_: bool = False,
          scores: torch.Tensor | None = None) -> PPO:  # fmt: skip
    """A PPO over the tiny model (a plain module, one process); the actor's head is nudged off
    the reference so that the KL penalty is not 0."""
    from rlhf_trainer.models.causal_lm import load_causal_lm

    config = stage(model_dir, options or {})
    inputs = SimpleNamespace(config=config, model_ref=str(model_dir), reward_model_ref=None,
                             total_steps=2, micro_batch=N // 2)  # fmt: skip
    actor, _ = load_causal_lm(config.model, str(model_dir))
    actor.train()
    with torch.no_grad():
        head = actor.get_output_embeddings().weight
        head.add_(0.1 * torch.randn(head.shape, generator=torch.Generator().manual_seed(5)))
    fixed = torch.linspace(-1.0, 1.0, N) if scores is None else scores
    reward = SimpleNamespace(score=lambda samples, prompts: fixed[: len(samples)].clone())
    setup = SimpleNamespace(inputs=inputs, ctx=ctx, actor=actor, reward=reward, async_=async_,
                            sampled_by_policy=sampled_by_policy,
                            tokenizer=SimpleNamespace(pad_token_id=0))  # fmt: skip
    torch.manual_seed(1)  # the critic's new value head
    return PPO(setup)  # type: ignore[arg-type]


def rollouts(step: int = 0) -> StepRollouts:
    """Random prompts and responses; behaviour logprobs spread over [-7, -1], so that some
    truncated IS weights hit the cap and others do not."""
    rng = random.Random(step)
    samples = []
    for i in range(N):
        prompt = tuple(rng.randrange(4, 64) for _ in range(rng.randrange(3, 8)))
        n = rng.randrange(1, 6)
        response = tuple(rng.randrange(4, 64) for _ in range(n))
        behaviour = tuple(rng.uniform(-7.0, -1.0) for _ in range(n))
        samples.append(Sample(i, prompt, response, behaviour, "length"))
    return StepRollouts([f"p{i}" for i in range(N)], samples)


@torch.no_grad()
def naive_logprobs(model: nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """log softmax(z / T) of each response token: one unpacked forward, row by row."""
    logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask)).logits  # fmt: skip
    p, r = batch.prompt_len, batch.response_mask.size(1)
    out = torch.zeros(batch.response_mask.shape)
    for i in range(out.size(0)):
        for t in range(r):
            if batch.response_mask[i, t] > 0:
                z = logits[i, p - 1 + t].double() / temperature
                out[i, t] = float(z[batch.sequences[i, p + t]] - torch.logsumexp(z, dim=0))
    return out


def naive_kl(d: float, estimator: str) -> float:
    """d = log π - log π_ref; Schulman's estimators (docs/ALGORITHMS.md)."""
    return {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[estimator]



@pytest.mark.parametrize(
    ("correction", "async_", "expected"),
    [("auto", False, False), ("auto", True, True), ("tis", False, True), ("tis", True, True),
     ("none", False, False), ("none", True, False)],
)  # fmt: skip
def test_correction_is_on_with_tis_or_auto_and_async(
    correction: str, async_: bool, expected: bool
) -> None:
    spec = {"rolloutCorrection": correction}
    for opts in (PPOOptions.model_validate(spec), GRPOOptions.model_validate(spec)):
        assert correction_on(opts, async_) is expected


def test_scoring_temperature_is_the_sampling_one_only_when_asked() -> None:
    sampling = {"logprobTemperature": "sampling"}
    assert scoring_temperature(PPOOptions(temperature=0.7)) == 1.0
    assert scoring_temperature(PPOOptions.model_validate({"temperature": 0.7, **sampling})) == 0.7
    assert scoring_temperature(GRPOOptions.model_validate({"temperature": 1.3, **sampling})) == 1.3


def test_the_ppo_max_preset_sets_its_fields_and_the_spec_wins() -> None:
    opts = PPOOptions.model_validate({"preset": "ppo-max"})
    for field, value in PPO_MAX_PRESET.items():
        assert getattr(opts, field) == value, field
    assert opts.reward_normalization and not opts.reward_scaling and opts.reward_clip == 10.0
    mine = PPOOptions.model_validate({"preset": "ppo-max", "criticWarmupSteps": 5})
    assert mine.critic_warmup_steps == 5 and mine.reward_clip == 10.0
    assert PPOOptions().advantage_whitening  # measured: it learns more (docs/ALGORITHMS.md)



@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_and_entropy_at_a_temperature(model_dir: Path, temperature: float) -> None:
    from rlhf_trainer.models.causal_lm import load_causal_lm

    model, _ = load_causal_lm(stage(model_dir, {}).model, str(model_dir))
    model.eval()
    batch = collate_samples(rollouts().samples, 0, CPU)
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(model, batch, True, temperature)
        both = tempered_and_raw_logprobs(model, batch, temperature)
    assert entropy is not None
    expected = naive_logprobs(model, batch, temperature)
    assert torch.allclose(logprobs, expected, atol=1e-5)
    assert torch.allclose(both[..., 0], expected, atol=1e-5)
    assert torch.allclose(both[..., 1], naive_logprobs(model, batch, 1.0), atol=1e-5)
    logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask)).logits  # fmt: skip
    p, r = batch.prompt_len, batch.response_mask.size(1)
    probs = torch.softmax(logits[:, p - 1 : p - 1 + r].double() / temperature, dim=-1)
    naive_entropy = -(probs * probs.log()).sum(-1) * batch.response_mask
    assert torch.allclose(entropy.double(), naive_entropy, atol=1e-4)
    if temperature != 1.0:  # the temperature did change them
        assert not torch.allclose(logprobs, both[..., 1], atol=1e-3)



def test_entropy_carries_gradients_only_when_the_loss_uses_it(model_dir: Path) -> None:
    """A diagnostic entropy keeps no graph (its softmax over the vocabulary is not saved for
    a backward never taken); an entropy bonus does; the values are the same."""
    from rlhf_trainer.models.causal_lm import load_causal_lm

    model, _ = load_causal_lm(stage(model_dir, {}).model, str(model_dir))
    batch = collate_samples(rollouts().samples, 0, CPU)
    logprobs, diagnostic = policy_logprobs(model, batch, True)
    _, bonus = policy_logprobs(model, batch, True, entropy_grad=True)
    assert diagnostic is not None and bonus is not None
    assert logprobs.requires_grad and bonus.requires_grad and not diagnostic.requires_grad
    assert torch.equal(diagnostic, bonus.detach())
    bonus.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_experience_with_tis_a_temperature_and_a_kl_estimator(
    model_dir: Path, ctx: DistContext, estimator: str
) -> None:
    t, cap, beta = 0.7, 2.0, 0.05
    algo = build(model_dir, ctx, {"logprobTemperature": "sampling", "temperature": t,
                                  "rolloutCorrection": "tis", "rolloutCorrectionCap": cap,
                                  "klEstimator": estimator})  # fmt: skip
    assert algo.reference is not None
    exp, shaped = algo.experience(0, rollouts())
    batch, mask = exp.batch, exp.batch.response_mask
    old = naive_logprobs(algo.setup.actor, batch, t)
    ref = naive_logprobs(algo.reference, batch, t)
    assert exp.old_logprobs is not None and exp.ref_logprobs is not None
    assert torch.allclose(exp.old_logprobs, old, atol=1e-5)  # π_old at T, not the samples'
    assert torch.allclose(exp.ref_logprobs, ref, atol=1e-5)
    # The IS weights compare the engine's logprobs with the trainer's at T = 1.
    log_ratio = naive_logprobs(algo.setup.actor, batch, 1.0) - batch.behaviour_logprobs
    assert exp.is_weights is not None
    weights, capped, mismatch, tokens = torch.zeros_like(mask), 0.0, 0.0, float(mask.sum())
    rewards, penalty = torch.zeros_like(mask), 0.0
    for i in range(mask.size(0)):
        n = int(mask[i].sum())
        for j in range(n):
            w = math.exp(float(log_ratio[i, j]))
            weights[i, j] = min(w, cap)
            capped += w > cap
            # k3 of KL(π_rollout || π_old), at most 10 per token as in verl (`KL_LIMIT`)
            mismatch += min(w - 1 - float(log_ratio[i, j]), 10.0)
            rewards[i, j] = -beta * naive_kl(float(old[i, j] - ref[i, j]), estimator)
            penalty += abs(float(rewards[i, j]))
        rewards[i, n - 1] += float(shaped[i])
    assert torch.allclose(exp.is_weights, weights, rtol=1e-4, atol=1e-6)
    assert 0 < capped < tokens  # both kinds of token are there
    metrics = algo.correction_metrics
    assert metrics["is_weight"] == pytest.approx(float(weights.sum()) / tokens, rel=1e-4)
    assert metrics["is_capped_fraction"] == pytest.approx(capped / tokens)
    assert metrics["rollout_mismatch_kl"] == pytest.approx(mismatch / tokens, rel=1e-4)
    assert exp.rewards is not None
    assert torch.allclose(exp.rewards, rewards, rtol=1e-4, atol=1e-5)
    assert penalty > 1e-4  # the actor is off the reference: the estimator is tested


@pytest.mark.parametrize(
    ("options", "sampled_by_policy", "async_", "from_samples", "weighted"),
    [
        ({}, True, False, True, False),  # the trainer's engine sampled them at T = 1
        ({}, False, True, False, True),  # async: auto turns the correction on
        ({"rolloutCorrection": "none"}, False, True, True, False),  # one step old, as before
        ({}, False, False, False, False),  # a server's logprobs: a forward pass
        ({"logprobTemperature": "sampling"}, True, False, False, False),  # T = 0.8
        ({"rolloutCorrection": "tis"}, True, False, False, True),
    ],
)  # fmt: skip
def test_where_pi_old_comes_from(
    model_dir: Path, ctx: DistContext, options: dict[str, Any], sampled_by_policy: bool,
    async_: bool, from_samples: bool, weighted: bool,
) -> None:  # fmt: skip
    algo = build(model_dir, ctx, options, sampled_by_policy=sampled_by_policy, async_=async_)
    batch = collate_samples(rollouts().samples, 0, CPU)
    old, weights = algo.old_logprobs(batch)
    assert (old is batch.behaviour_logprobs) is from_samples
    if not from_samples:
        expected = naive_logprobs(algo.setup.actor, batch, algo.temperature)
        assert torch.allclose(old, expected, atol=1e-5)
    assert (weights is not None) is weighted



def perturbed(algo: PPO, seed: int = 0) -> Experience:
    """A micro-batch with π_old off the current policy by up to ±1 nat (ratios 0.37..2.7),
    advantages of both signs and IS weights in [0, 2]."""
    g = torch.Generator().manual_seed(seed)
    batch = collate_samples(rollouts().samples, 0, CPU)
    mask = batch.response_mask
    current = naive_logprobs(algo.setup.actor, batch, 1.0)  # the same for every variant
    old = (current + (torch.rand(mask.shape, generator=g) * 2.0 - 1.0)) * mask
    advantages = torch.randn(mask.shape, generator=g) * 2 * mask
    weights = torch.rand(mask.shape, generator=g) * 2 * mask
    return Experience(batch, old, advantages, torch.zeros(N), is_weights=weights)


def naive_policy_loss(
    logprobs: torch.Tensor, exp: Experience, eps: float, eps_high: float | None,
    dual: float | None, weighted: bool,
) -> tuple[float, int]:  # fmt: skip
    """Σ over tokens of w · l, l = max(-ρA, -clip(ρ, 1 - ε, 1 + ε_h)A), then min(l, -cA) for
    A < 0; and how many tokens took a clipped branch."""
    assert exp.old_logprobs is not None and exp.is_weights is not None
    total, clipped = 0.0, 0
    mask = exp.batch.response_mask
    high = eps if eps_high is None else eps_high
    for i, j in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        a = float(exp.advantages[i, j])
        ratio = math.exp(float(logprobs[i, j] - exp.old_logprobs[i, j]))
        plain, bounded = -ratio * a, -min(max(ratio, 1 - eps), 1 + high) * a
        loss, took = max(plain, bounded), bounded > plain
        if dual is not None and a < 0 and -dual * a < loss:
            loss, took = -dual * a, True
        total += loss * (float(exp.is_weights[i, j]) if weighted else 1.0)
        clipped += took
    return total, clipped


VARIANTS = {
    "plain": {},
    "clip-high": {"policyClipHigh": 0.28},
    "dual-clip": {"dualClip": 1.5},
    "tis": {"rolloutCorrection": "tis"},
    "temperature": {"logprobTemperature": "sampling", "temperature": 0.6},
    "all": {"policyClipHigh": 0.28, "dualClip": 1.5, "rolloutCorrection": "tis",
            "logprobTemperature": "sampling", "temperature": 0.6},
}  # fmt: skip


def policy_loss(model_dir: Path, ctx: DistContext, options: dict[str, Any]) -> tuple[float, ...]:
    """(the stage's loss, its clipped count, the naive loss, the naive count) on `perturbed`."""
    algo = build(model_dir, ctx, options)
    full = perturbed(algo)
    exp = full if algo.correction else replace(full, is_weights=None)
    with torch.no_grad():
        loss, sums = algo._policy_loss(exp)
        current = naive_logprobs(algo.setup.actor, exp.batch, algo.temperature)
    opts = algo.opts
    naive, count = naive_policy_loss(current, full, opts.policy_clip, opts.policy_clip_high,
                                     opts.dual_clip, algo.correction)  # fmt: skip
    return float(loss), sums["clipped"], naive, float(count)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_option_changes_the_policy_loss_as_its_equation_says(
    model_dir: Path, ctx: DistContext, variant: str
) -> None:
    loss, clipped, naive, count = policy_loss(model_dir, ctx, VARIANTS[variant])
    assert loss == pytest.approx(naive, rel=1e-4, abs=1e-5)
    assert clipped == count
    if variant != "plain":
        plain, plain_clipped, _, _ = policy_loss(model_dir, ctx, {})
        assert abs(loss - plain) > 1e-3 * max(1.0, abs(plain)), "the option changed nothing"
        if variant == "dual-clip":  # tokens with A < 0 and ρ > 1.5 take the dual bound
            assert clipped > plain_clipped



def test_a_step_of_equal_rewards_warns_and_stays_bounded(
    model_dir: Path, ctx: DistContext, caplog: pytest.LogCaptureFixture
) -> None:
    algo = build(model_dir, ctx, {"preset": "ppo-max"}, scores=torch.full((N,), 3.0))
    with caplog.at_level(logging.WARNING, logger="rlhf_trainer.online.ppo"):
        for step in range(2):
            exp, shaped = algo.experience(step, rollouts(step))
            assert exp.rewards is not None and bool(exp.rewards.abs().max() < 10.0)
            assert bool(shaped.abs().max() <= 10.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(w.startswith(f"Every reward of step {s} was 3:") for s, w in enumerate(warnings))
    caplog.clear()
    varied = build(model_dir, ctx)
    with caplog.at_level(logging.WARNING, logger="rlhf_trainer.online.ppo"):
        varied.experience(0, rollouts())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]



def test_ranks_read_disjoint_ptx_examples_from_one_global_stream() -> None:
    examples = [Example([1, 2 + i], [-100, 2 + i]) for i in range(20)]
    ranks = [PtxSource(examples, 7, 0, CPU, rank, 2) for rank in (0, 1)]
    alone = PtxSource(examples, 7, 0, CPU)
    for _ in range(4):  # past the end of the first epoch too
        mine, theirs = (source.next_indices(4) for source in ranks)
        assert len(mine) == len(theirs) == 4
        assert not set(mine) & set(theirs)
        assert mine + theirs == alone.next_indices(8)  # the global batch, split by rank
    assert ranks[0].position() == ranks[1].position() == alone.position()


def test_the_ptx_loss_reads_the_ranks_own_examples() -> None:
    examples = [Example([1, 2 + i, 3], [-100, 2 + i, 3]) for i in range(16)]
    seen: list[list[int]] = []

    class Recorder(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            seen.append(input_ids[:, 1].tolist())
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 64, requires_grad=True))

    for rank in (0, 1):
        source = PtxSource(examples, 7, 0, CPU, rank, 2)
        _, tokens = source.loss(Recorder(), 3)
        assert tokens == 6.0
    assert len(seen) == 2 and not set(seen[0]) & set(seen[1])



def test_dropout_is_off_in_every_online_model(
    tmp_path: Path, ctx: DistContext
) -> None:
    from rlhf_trainer.models.causal_lm import load_causal_lm
    from rlhf_trainer.models.online_models import load_policy, load_reference, load_value_model

    path = tiny_llama(tmp_path / "dropout", attention_dropout=0.3)
    config = stage(path, {})
    batch = collate_samples(rollouts().samples, 0, CPU)

    def twice(fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return fn(), fn()

    raw, _ = load_causal_lm(config.model, str(path))
    raw.train()  # the control: as loaded, train mode draws a fresh dropout mask per pass
    a, b = twice(lambda: policy_logprobs(raw, batch)[0])
    assert not torch.equal(a, b)
    actor, _, _ = load_policy(config, str(path), ctx)
    assert actor.training
    a, b = twice(lambda: policy_logprobs(actor, batch)[0])
    assert torch.equal(a, b)  # two π_old passes
    critic = load_value_model(str(path), trainable=True, bf16=False)
    assert critic.training
    a, b = twice(lambda: critic_values(critic, batch))
    assert torch.equal(a, b)
    reference = load_reference(config.model, str(path), bf16=False)
    reference.train()  # even if something put it in train mode
    a, b = twice(lambda: policy_logprobs(reference, batch)[0])
    assert torch.equal(a, b)



def test_per_sample_divides_by_the_minibatchs_samples(ctx: DistContext) -> None:
    setup = minibatch_setup(ctx, 2, batchSize=4, learningRate=1e-3)
    lengths = torch.tensor([1, 2, 3, 4, 1, 3, 2, 4])
    mask = (torch.arange(4).unsqueeze(0) < lengths.unsqueeze(1)).float()
    batch = Batch(torch.zeros(8, 5, dtype=torch.long), torch.ones(8, 5, dtype=torch.long),
                  mask, torch.zeros(8, 4))  # fmt: skip
    exp = Experience(batch, None, torch.zeros(8), torch.zeros(8))
    model = nn.Linear(1, 1)

    def loss(sub: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        rows = float(sub.batch.response_mask.size(0))
        tokens = float(sub.batch.response_mask.sum())
        return model.weight.sum() * 0 + rows, {"rows": rows, "tokens": tokens}

    def run(per_sample: bool) -> dict[str, float]:
        optimizer, scheduler = build_optimizer(model, setup.inputs.config.hyperparameters, 2)
        trainer = MinibatchTrainer(setup, model, optimizer, scheduler)
        return trainer.run(exp, loss, random.Random(0), per_sample=per_sample)

    per_sample, per_token = run(True), run(False)
    assert per_sample["rows"] == per_sample["loss"] == 1.0
    assert per_sample["tokens"] == pytest.approx(float(mask.sum()) / 8)  # mean of 2 minibatches
    assert per_token["tokens"] == 1.0
    assert per_token["rows"] != 1.0
