"""GRPO (Shao et al. 2024, "DeepSeekMath"): critic-free online RL.

Per step: G completions for each of `rolloutBatchSize` prompts from the rollout servers; each
completion's reward (reward model or reward function); the group-relative advantage
(r - mean_group) / (std_group + 1e-4) (or batch-scaled, or unscaled), the same for every token;
then one pass over the samples in minibatches of `batchSize` with the per-token clipped surrogate
(ε = `clip`) plus β·(exp(d) - d - 1), d = log π_ref - log π, normalised by the active tokens of
the whole minibatch. β = 0 loads no reference model.

When a step's samples fit one minibatch (rolloutBatchSize × G ≤ batchSize) and generation is
synchronous, the one optimizer step starts from the policy that sampled them: π_old is the
current policy, so the ratio takes the loss pass's own logprobs, detached, and no separate
π_old forward pass runs (TRL's GRPOTrainer does the same with one iteration). Otherwise π_old
is the servers' behaviour logprobs with `async: true`, the samples' own logprobs when the
trainer generated them (`rollout.engine: trainer`), else a forward pass of its own.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_trainer.advantages import group_advantages
from rlhf_trainer.config import GRPOOptions
from rlhf_trainer.data import PromptRow
from rlhf_trainer.experience import Experience, collate_samples, policy_logprobs
from rlhf_trainer.feed import StepRollouts
from rlhf_trainer.loop import build_optimizer
from rlhf_trainer.losses import grpo_loss, kl_k3
from rlhf_trainer.online import run_online, shard
from rlhf_trainer.online_models import load_reference
from rlhf_trainer.online_setup import OnlineSetup
from rlhf_trainer.online_steps import MinibatchTrainer, forward_in_chunks, rank_rows, rename
from rlhf_trainer.preflight import StageInputs
from rlhf_trainer.rollout import Sampling


def gather_scores(local: torch.Tensor) -> torch.Tensor:
    """Every rank's scores in rank order (collective): (B,) -> (world * B,)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


class GRPO:
    def __init__(self, setup: OnlineSetup) -> None:
        config = setup.inputs.config
        self.setup, self.opts = setup, config.grpo or GRPOOptions()
        opts, hp = self.opts, config.hyperparameters
        self.sampling = Sampling(
            n=opts.num_generations,
            max_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
        )
        self.prompts_per_step = opts.rollout_batch_size
        self.reference: nn.Module | None = None
        if opts.kl_coef > 0:
            self.reference = load_reference(config.model, setup.inputs.model_ref, setup.ctx.bf16)
        samples = opts.rollout_batch_size * opts.num_generations
        optimizer_steps = setup.inputs.total_steps * (samples // hp.batch_size)
        self.optimizer, self.scheduler = build_optimizer(setup.actor, hp, optimizer_steps)
        # A step's samples in one minibatch: one optimizer step, taken from the very policy
        # that sampled them (synchronous mode), so π_old needs no forward pass of its own.
        self.one_update = samples <= hp.batch_size and not setup.async_
        self.trainer = MinibatchTrainer(setup, setup.actor, self.optimizer, self.scheduler)

    def modules(self) -> nn.Module:
        return self.setup.actor

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def train(self, step: int, rollouts: StepRollouts) -> tuple[dict[str, float], bool]:
        setup, opts = self.setup, self.opts
        mine = shard(rollouts.samples, setup.ctx)
        scores = setup.reward.score(mine, rollouts.prompts)
        everyone = gather_scores(scores.to(setup.ctx.device)).cpu()
        advantages = rank_rows(
            group_advantages(everyone, opts.num_generations, opts.scale_rewards), setup.ctx
        )
        batch = collate_samples(mine, int(setup.tokenizer.pad_token_id), setup.ctx.device)
        old = None
        if setup.async_ or (setup.sampled_by_policy and not self.one_update):
            old = batch.behaviour_logprobs
        elif not self.one_update:
            old = forward_in_chunks(setup, batch, lambda b: policy_logprobs(setup.actor, b)[0])
        ref = None
        if self.reference is not None:
            reference = self.reference
            ref = forward_in_chunks(setup, batch, lambda b: policy_logprobs(reference, b)[0])
        exp = Experience(
            batch=batch,
            old_logprobs=old,
            advantages=advantages.to(setup.ctx.device),
            scores=scores,
            ref_logprobs=ref,
        )
        rng = random.Random(setup.inputs.config.hyperparameters.seed + step)
        metrics = rename(self.trainer.run(exp, self._loss, rng))
        return metrics | {
            "reward_mean": float(everyone.mean()),
            "reward_std": float(everyone.std()) if everyone.numel() > 1 else 0.0,
        }, True

    def _loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch: (summed loss, summed diagnostics)."""
        opts = self.opts
        mask = exp.batch.response_mask
        logprobs, entropy = policy_logprobs(self.setup.actor, exp.batch, with_entropy=True)
        old = logprobs.detach() if exp.old_logprobs is None else exp.old_logprobs
        loss, clipped = grpo_loss(
            logprobs, old, exp.ref_logprobs, exp.advantages, mask, opts.clip,
            opts.kl_coef,
        )
        assert entropy is not None
        sums = {"clipped": float(clipped), "entropy": float(entropy.detach().sum())}
        if exp.ref_logprobs is not None:
            sums["kl"] = float((kl_k3(logprobs.detach(), exp.ref_logprobs) * mask).sum())
        return loss, sums


def run_grpo(inputs: StageInputs[PromptRow]) -> None:
    options = inputs.config.grpo or GRPOOptions()
    run_online(inputs, GRPO, options.num_generations)
