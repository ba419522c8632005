"""PPO's critic values at sampling time, taken from the critic's own update pass when the step
makes one critic update on the whole batch (`UpdateSchedule.fold_values`), against the separate
no-grad forward pass they replace: the same advantages, losses and updated actor and critic, on
a 1-rank gloo group with real models, optimizers and a random tiny Llama."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import save_small_llama
from rlhf_trainer.config import StageConfig
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.online.ppo import PPO
from rlhf_trainer.rollout.client import Sample
from rlhf_trainer.runtime.distributed import DistContext

pytestmark = pytest.mark.unit

PROMPTS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_llama(tmp_path_factory.mktemp("tiny-llama"))


def ppo(model_dir: Path, ctx: DistContext, fold: bool | None, epochs: int = 1) -> PPO:
    """A PPO step maker over the tiny model; `fold` None keeps what the constructor decided."""
    from rlhf_trainer.models.causal_lm import load_causal_lm

    config = StageConfig.model_validate({
        "run": "r", "stage": "ppo", "type": "ppo", "model": {"path": str(model_dir)},
        "dataset": {"path": "prompts.jsonl", "format": "prompts"}, "outputDir": "r/ppo",
        "rewardFunction": "animal_sounds", "hyperparameters": {"batchSize": PROMPTS, "seed": 3,
        "learningRate": 1e-3}, "ppo": {"rolloutBatchSize": PROMPTS, "ppoEpochs": epochs,
        "criticLearningRate": 1e-3, "klCoef": 0.05},
    })  # fmt: skip
    inputs = SimpleNamespace(config=config, model_ref=str(model_dir), reward_model_ref=None,
                             total_steps=2, micro_batch=PROMPTS // 2)  # fmt: skip
    actor, _ = load_causal_lm(config.model, str(model_dir))
    actor.train()
    scores = torch.linspace(-1.0, 1.0, PROMPTS)
    reward = SimpleNamespace(score=lambda samples, prompts: scores[: len(samples)].clone())
    setup = SimpleNamespace(inputs=inputs, ctx=ctx, actor=actor, reward=reward, async_=False,
                            sampled_by_policy=False,
                            tokenizer=SimpleNamespace(pad_token_id=0))  # fmt: skip
    torch.manual_seed(1)  # the critic's new value head
    algo = PPO(setup)  # type: ignore[arg-type]
    if fold is not None:
        algo.schedule = replace(algo.schedule, fold_values=fold)
    return algo


def rollouts(step: int) -> StepRollouts:
    rng = random.Random(step)
    samples = []
    for i in range(PROMPTS):
        prompt = tuple(rng.randrange(4, 64) for _ in range(rng.randrange(3, 8)))
        response = tuple(rng.randrange(4, 64) for _ in range(rng.randrange(1, 6)))
        samples.append(Sample(i, prompt, response, (-1.0,) * len(response), "length"))
    return StepRollouts([f"p{i}" for i in range(PROMPTS)], samples)


def parameters(module: Any) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_folded_values_give_the_same_steps_as_a_forward_pass(
    model_dir: Path, ctx: DistContext
) -> None:
    folded, forward = ppo(model_dir, ctx, fold=True), ppo(model_dir, ctx, fold=False)
    for step in range(2):
        a, _ = folded.train(step, rollouts(step))
        b, _ = forward.train(step, rollouts(step))
        for key in ("value_loss", "policy_loss", "explained_variance", "kl", "grad_norm",
                    "critic_grad_norm", "clip_fraction"):  # fmt: skip
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    pairs = ((folded.setup.actor, forward.setup.actor), (folded.critic, forward.critic))
    for mine, theirs in pairs:
        assert torch.allclose(parameters(mine), parameters(theirs), atol=1e-6)
    moved = ppo(model_dir, ctx, fold=False)  # the updates were not no-ops
    assert not torch.allclose(parameters(folded.critic), parameters(moved.critic), atol=1e-4)


def test_only_one_critic_update_per_step_folds(model_dir: Path, ctx: DistContext) -> None:
    assert ppo(model_dir, ctx, None).schedule.fold_values  # one minibatch, one epoch
    assert not ppo(model_dir, ctx, None, epochs=2).schedule.fold_values  # V_old must stay fixed
