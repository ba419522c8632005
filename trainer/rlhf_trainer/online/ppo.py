"""PPO with the PPO-max switches (Zheng et al. 2023, "Secrets of RLHF in Large Language Models
Part I: PPO"; defaults from OpenLMLab/MOSS-RLHF).

Models: the actor (the policy, from the `from` stage), the critic (from the reward model of
`reward.from`; from the policy with a new value head when rewards come from a function), the
frozen reference (a copy of the initial policy; loaded when β > 0 or the KL controller is
adaptive) and the reward source; dropout is off in all of them (`online_models`), so π_old,
V and π_ref are deterministic. Per step, one sample per prompt:

0. log π_old: the samples' own logprobs when they are the policy's (`rollout.engine: trainer`)
   or one step old (`async: true`), else a forward pass; always a forward pass with the
   truncated IS correction (`rolloutCorrection`, `online_steps.correction_on`: each token's
   policy loss weighted by min(π_old / π_rollout, C)) or with logprobs at the sampling
   temperature (`logprobTemperature: sampling`: every actor and reference pass divides the
   logits by T);
1. rewards: the raw score, then `rewardScaling` (÷ running std) or `rewardNormalization`
   (standardise with the running moments), then `rewardClip`; the per-token KL penalty
   -β KL_t(π_old, π_ref) (`klEstimator` k1, k2 or k3) on every token, the shaped score on the
   last one; a step whose rewards are all equal is logged as a warning (no reward signal);
2. GAE (γ, λ) over response tokens, returns = A + V; `advantageWhitening` with global stats.
   V is the critic's value at sampling time: a forward pass of its own, or, when the step makes
   one critic update on the whole batch (one minibatch, one epoch), that update's own pass,
   detached (`UpdateSchedule.fold_values`; the value clip is then inactive, as on any first
   epoch);
3. `ppoEpochs` passes in minibatches of `batchSize`: the critic on the clipped value loss
   (`valueClip`), and, after `criticWarmupSteps`, the actor on the clipped surrogate
   (ratio in [1 - `policyClip`, 1 + `policyClipHigh`], `dualClip` bounding negative-advantage
   tokens), minus `entropyCoef` × entropy, plus `ptxCoef` × an LM loss on `ptxDataset` (each
   rank its own slice of a global batch); gradients clipped to `gradClip`; the two updates run
   at once when the resources allow it (one unsharded process with cores to spare); which
   updates run, and how, is the step's `UpdateSchedule` (online/ppo_schedule.py);
4. the KL controller (fixed, or adaptive toward `klTarget`) sees the step's KL (k1, summed
   over each sequence).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rlhf_trainer.algos.advantages import gae, masked_sums, whiten
from rlhf_trainer.algos.losses import sft_loss_sum
from rlhf_trainer.algos.policy_losses import approx_kl, clipped_surrogate, clipped_value_loss
from rlhf_trainer.algos.reward_shaping import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_rewards,
    has_scale,
    kl_penalized_rewards,
    normalize,
    scale_by_std,
)
from rlhf_trainer.config import PPOOptions
from rlhf_trainer.data.batching import DataStream, Example, collate, tokenize_sft
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PromptRow, dataset_chat, load_sft_rows
from rlhf_trainer.models.online_models import load_reference, load_value_model
from rlhf_trainer.online.experience import (
    Batch,
    Experience,
    collate_samples,
    critic_values,
    policy_logprobs,
)
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.online.loop import run_online, shard
from rlhf_trainer.online.ppo_schedule import UpdateSchedule
from rlhf_trainer.online.setup import OnlineSetup
from rlhf_trainer.online.steps import (
    MinibatchTrainer,
    check_fits,
    corrected_old_logprobs,
    correction_on,
    forward_in_chunks,
    global_mean_std,
    rename,
    scoring_temperature,
)
from rlhf_trainer.rollout.client import Sampling
from rlhf_trainer.runtime.distributed import all_reduce_sum
from rlhf_trainer.training.loop import build_optimizer

log = logging.getLogger(__name__)


class PPO:
    def __init__(self, setup: OnlineSetup) -> None:
        inputs, ctx = setup.inputs, setup.ctx
        self.setup, self.opts = setup, inputs.config.ppo or PPOOptions()
        opts, hp = self.opts, inputs.config.hyperparameters
        self.sampling = Sampling(
            n=1, max_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p
        )
        self.prompts_per_step = opts.rollout_batch_size
        self.reference: nn.Module | None = None
        if opts.kl_coef > 0 or opts.kl_controller == "adaptive":
            self.reference = load_reference(inputs.config.model, inputs.model_ref, ctx.bf16)
        self.critic = load_value_model(
            inputs.reward_model_ref or inputs.model_ref, trainable=True, bf16=ctx.bf16
        )
        per_step = (opts.rollout_batch_size // hp.batch_size) * opts.ppo_epochs
        actor_steps = max(inputs.total_steps - opts.critic_warmup_steps, 1) * per_step
        self.actor_opt, self.actor_sched = build_optimizer(setup.actor, hp, actor_steps)
        critic_hp = hp.model_copy(update={"learning_rate": opts.critic_learning_rate})
        self.critic_opt, self.critic_sched = build_optimizer(
            self.critic, critic_hp, inputs.total_steps * per_step
        )
        check_fits(setup, [setup.actor, self.critic])
        self.actor_steps = MinibatchTrainer(setup, setup.actor, self.actor_opt, self.actor_sched)
        self.critic_steps = MinibatchTrainer(setup, self.critic, self.critic_opt, self.critic_sched)
        self.moments = RunningMoments()
        self.kl_ctl: FixedKLController = (
            AdaptiveKLController(opts.kl_coef, opts.kl_target or 1.0, opts.kl_horizon)
            if opts.kl_controller == "adaptive"
            else FixedKLController(opts.kl_coef)
        )
        self.ptx = PtxSource.from_setup(setup, opts) if opts.ptx_coef > 0 else None
        self.temperature = scoring_temperature(opts)
        self.correction = correction_on(opts, setup.async_)
        self.correction_metrics: dict[str, float] = {}  # the step's, with the correction
        self.schedule = UpdateSchedule.plan(
            ctx, (setup.actor, self.critic), per_step, opts.critic_warmup_steps
        )

    def modules(self) -> nn.Module:
        return nn.ModuleDict({"actor": self.setup.actor, "critic": self.critic})

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.actor_opt, self.critic_opt]

    def state_dict(self) -> dict[str, Any]:
        return {
            "actor_scheduler": self.actor_sched.state_dict(),
            "critic_scheduler": self.critic_sched.state_dict(),
            "reward_moments": self.moments.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "ptx": self.ptx.position() if self.ptx is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor_sched.load_state_dict(state["actor_scheduler"])
        self.critic_sched.load_state_dict(state["critic_scheduler"])
        self.moments.load_state_dict(state["reward_moments"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.seek(*state["ptx"])

    def shape(self, step: int, scores: torch.Tensor) -> torch.Tensor:
        """The PPO-max reward switches, in order: moments update, scale or normalise, clip.
        A step whose rewards are all equal (over all ranks) is worth a warning."""
        opts = self.opts
        mean, std = self.moments.update(scores)  # collective
        if not has_scale(mean, std):
            log.warning(
                "Every reward of step %d was %.4g: the step carries no reward signal, only the "
                "KL penalty (a reward function or model that cannot tell samples apart?)",
                step, mean,
            )  # fmt: skip
        shaped = scores
        if opts.reward_normalization:
            shaped = normalize(shaped, self.moments)
        elif opts.reward_scaling:
            shaped = scale_by_std(shaped, self.moments)
        if opts.reward_clip is not None:
            shaped = clip_rewards(shaped, opts.reward_clip)
        return shaped

    def logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """log π of the sampled tokens (B, R) at the scoring temperature, no grad, in chunks."""
        t = self.temperature
        return forward_in_chunks(
            self.setup, batch, lambda b: policy_logprobs(model, b, False, t)[0]
        )

    def old_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log π_old (B, R), the truncated IS weights (B, R) or None without the correction).
        The samples' own logprobs serve as π_old where they are the policy's at T = 1 (the
        trainer's engine, or one step old with `async`) and no correction compares them."""
        setup, t = self.setup, self.temperature
        if self.correction:
            cap = self.opts.rollout_correction_cap
            old, weights, self.correction_metrics = corrected_old_logprobs(setup, batch, t, cap)
            return old, weights
        if (setup.async_ or setup.sampled_by_policy) and t == 1.0:
            return batch.behaviour_logprobs, None
        return self.logprobs(setup.actor, batch), None

    def experience(self, step: int, rollouts: StepRollouts) -> tuple[Experience, torch.Tensor]:
        """The step's experience and shaped scores. Values, returns and advantages are left
        for the critic's update pass when `fold_values`; else a forward pass gives them."""
        setup, device, opts = self.setup, self.setup.ctx.device, self.opts
        mine = shard(rollouts.samples, setup.ctx)
        scores = setup.reward.score(mine, rollouts.prompts).to(device)
        batch = collate_samples(mine, int(setup.tokenizer.pad_token_id), device)
        mask = batch.response_mask
        old, weights = self.old_logprobs(batch)
        ref = old if self.reference is None else self.logprobs(self.reference, batch)
        shaped = self.shape(step, scores)
        beta = self.kl_ctl.beta
        rewards = kl_penalized_rewards(shaped, old, ref, mask, beta, opts.kl_estimator)
        row = torch.arange(len(mine), device=device)
        exp = Experience(batch, old, torch.zeros_like(mask), scores, ref, rewards=rewards, row=row,
                         is_weights=weights)  # fmt: skip
        if not self.schedule.fold_values:
            values = forward_in_chunks(setup, batch, lambda b: critic_values(self.critic, b))
            exp = self.with_values(exp, values)
        return exp, shaped

    def with_values(self, exp: Experience, values: torch.Tensor) -> Experience:
        """The experience with the critic's values at sampling time, GAE's returns and the
        advantages (whitened over all ranks when `advantageWhitening`). Collective."""
        opts, device, mask = self.opts, self.setup.ctx.device, exp.batch.response_mask
        assert exp.rewards is not None
        advantages, returns = gae(exp.rewards, values, mask, opts.gamma, opts.lam)
        if opts.advantage_whitening:
            sums = masked_sums(advantages, mask).to(device)
            total = torch.tensor(all_reduce_sum(sums.tolist(), device), dtype=torch.float64)
            advantages = whiten(advantages, mask, total)
        return replace(exp, advantages=advantages, values=values, returns=returns)

    def _stats(self, exp: Experience, shaped: torch.Tensor) -> dict[str, float]:
        device, mask = self.setup.ctx.device, exp.batch.response_mask
        assert exp.ref_logprobs is not None and exp.values is not None
        assert exp.returns is not None and exp.old_logprobs is not None
        seq_kl = ((exp.old_logprobs - exp.ref_logprobs) * mask).sum(dim=1)
        kl, _ = global_mean_std(seq_kl, device)
        raw_mean, raw_std = global_mean_std(exp.scores, device)
        scaled_mean, scaled_std = global_mean_std(shaped, device)
        error = (exp.returns - exp.values) * mask
        stats = [masked_sums(exp.returns, mask), masked_sums(error, mask)]
        sums = all_reduce_sum(torch.cat(stats).tolist(), device)
        var_returns = sums[1] / max(sums[2], 1) - (sums[0] / max(sums[2], 1)) ** 2
        var_error = sums[4] / max(sums[5], 1) - (sums[3] / max(sums[5], 1)) ** 2
        explained = 1.0 - var_error / var_returns if var_returns > 1e-12 else 0.0
        return {
            "reward_mean": raw_mean,
            "reward_std": raw_std,
            "reward_scaled_mean": scaled_mean,
            "reward_scaled_std": scaled_std,
            "kl": kl,
            "kl_coef": self.kl_ctl.beta,
            "explained_variance": explained,
        }

    def train(self, step: int, rollouts: StepRollouts) -> tuple[dict[str, float], bool]:
        exp, shaped = self.experience(step, rollouts)
        seed, epochs = self.setup.inputs.config.hyperparameters.seed + step, self.opts.ppo_epochs
        critic_rng, actor_rng = random.Random(seed), random.Random(~seed)
        folded: dict[str, float] | None = None
        if self.schedule.fold_values:
            exp, folded = self.fold_critic(exp, critic_rng)
        metrics = self._stats(exp, shaped) | self.correction_metrics
        self.kl_ctl.update(metrics["kl"], len(rollouts.samples))
        critic, actor = self.schedule.update(
            step,
            lambda: self.critic_steps.run(exp, self._value_loss, critic_rng, epochs),
            lambda: self.actor_steps.run(exp, self._policy_loss, actor_rng, epochs),
            folded,
        )
        if actor is not None:
            metrics |= rename(actor)
        metrics |= {"value_loss": critic["value_loss"], "critic_grad_norm": critic["grad_norm"]}
        metrics["loss"] = metrics.get("policy_loss", 0.0) + metrics["value_loss"]
        return metrics, actor is not None

    def fold_critic(
        self, exp: Experience, rng: random.Random
    ) -> tuple[Experience, dict[str, float]]:
        """The critic's one update of the step, whose pass also gives its values at sampling
        time: (the experience with them, GAE's returns and the advantages; the update's
        metrics)."""
        sampled = torch.zeros_like(exp.batch.response_mask)
        folded = self.critic_steps.run(exp, lambda sub: self._folded_value_loss(sub, sampled), rng)
        return self.with_values(exp, sampled), folded

    def _folded_value_loss(
        self, exp: Experience, sampled: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The value loss when the critic's update pass also gives its values at sampling time
        (`fold_values`): V_old = V (detached), so the clip is inactive, as on a first epoch;
        they go to `sampled` at the micro-batch's rows, for the actor's advantages."""
        assert exp.rewards is not None and exp.row is not None
        mask = exp.batch.response_mask
        values = critic_values(self.critic, exp.batch)
        old = values.detach()
        sampled[exp.row] = old
        _, returns = gae(exp.rewards, old, mask, self.opts.gamma, self.opts.lam)
        loss = clipped_value_loss(values, old, returns, mask, self.opts.value_clip)
        return loss, {"value_loss": float(loss.detach())}

    def _value_loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        assert exp.values is not None and exp.returns is not None
        mask = exp.batch.response_mask
        values = critic_values(self.critic, exp.batch)
        loss = clipped_value_loss(values, exp.values, exp.returns, mask, self.opts.value_clip)
        return loss, {"value_loss": float(loss.detach())}

    def _policy_loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        opts, mask = self.opts, exp.batch.response_mask
        logprobs, entropy = policy_logprobs(self.setup.actor, exp.batch, True, self.temperature,
                                            entropy_grad=opts.entropy_coef > 0)  # fmt: skip
        assert entropy is not None and exp.old_logprobs is not None
        loss, clipped = clipped_surrogate(
            logprobs, exp.old_logprobs, exp.advantages, mask, opts.policy_clip,
            clip_high=opts.policy_clip_high, dual_clip=opts.dual_clip, weights=exp.is_weights,
        )  # fmt: skip
        sums = {
            "policy_loss": float(loss.detach()),
            "clipped": float(clipped),
            "approx_kl": float(approx_kl(logprobs.detach(), exp.old_logprobs, mask)),
            "entropy": float(entropy.detach().sum()),
        }
        if opts.entropy_coef > 0:
            loss = loss - opts.entropy_coef * entropy.sum()
        if self.ptx is not None:
            ptx_sum, ptx_tokens = self.ptx.loss(self.setup.actor, exp.batch.sequences.size(0))
            # Scaled so that, once divided by the response tokens, it is ptxCoef x the LM loss
            # averaged over this micro-batch's supervised tokens.
            tokens = float(mask.sum())
            loss = loss + opts.ptx_coef * ptx_sum * (tokens / max(ptx_tokens, 1.0))
            sums["ptx_loss"] = float(ptx_sum.detach()) * tokens / max(ptx_tokens, 1.0)
        return loss, sums


class PtxSource:
    """Supervised examples for PPO-ptx: an endless, seeded stream over `ppo.ptxDataset` that
    every rank walks in step; each call takes a global batch of n × world size examples from
    it, and each rank its own slice (as the offline stages shard theirs), so ranks never read
    the same examples in a step."""

    def __init__(
        self,
        examples: list[Example],
        seed: int,
        pad: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.examples, self.pad, self.device = examples, pad, device
        self.rank, self.world_size = rank, world_size
        self.stream = DataStream(len(examples), seed)

    @classmethod
    def from_setup(cls, setup: OnlineSetup, opts: PPOOptions) -> PtxSource:
        assert opts.ptx_dataset is not None  # preflight
        hp, ctx = setup.inputs.config.hyperparameters, setup.ctx
        chat = dataset_chat(opts.ptx_dataset, setup.inputs.config.model)
        rows = load_sft_rows(opts.ptx_dataset, chat)
        examples = tokenize_sft(rows, setup.tokenizer, hp.max_length)
        pad = int(setup.tokenizer.pad_token_id)
        return cls(examples, hp.seed + 1, pad, ctx.device, ctx.rank, ctx.world_size)

    def position(self) -> tuple[int, int]:
        return self.stream.epoch, self.stream.index

    def seek(self, epoch: int, index: int) -> None:
        self.stream = self.stream.at(epoch, index)

    def next_indices(self, n: int) -> list[int]:
        """This rank's `n` examples of the next global batch (the same position on every
        rank, as every rank runs the same number of micro-batches)."""
        batch = self.stream.next_batch(n * self.world_size)
        return batch[self.rank * n : (self.rank + 1) * n]

    def loss(self, model: nn.Module, n: int) -> tuple[torch.Tensor, float]:
        """Summed LM loss of this rank's next `n` examples, and their target-token count."""
        batch = collate([self.examples[i] for i in self.next_indices(n)], self.pad)
        tensors = {k: v.to(self.device) for k, v in batch.items()}
        logits = model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).logits
        labels = tensors["labels"]
        return sft_loss_sum(logits, labels), float((labels[:, 1:] != -100).sum())


def run_ppo(inputs: StageInputs[PromptRow]) -> None:
    run_online(inputs, PPO, 1)
