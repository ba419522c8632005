"""GRPO (Shao et al. 2024, "DeepSeekMath"): critic-free online RL, with the options of its 2025
peers (docs/ALGORITHMS.md, "GRPO"). Per step:

1. G completions for each of `rolloutBatchSize` prompts, scored by the reward model, judge or
   function. `overlongPenalty` (DAPO, Yu et al. 2025) adds to each completion's reward, with
   L_max = maxNewTokens and k = L_max - buffer: 0 if |y| <= k, (k - |y|) / buffer · factor up
   to L_max, -factor past it (`rewards.overlong_penalty`). `dynamicSampling` (DAPO) drops the
   groups whose rewards are all equal and samples more prompts (`online/grpo_sampling.py`).
2. Advantages (`advantageEstimator`):
   grpo:        A_i = (r_i - mean_group) / (std_group + 1e-4), or the batch std, or unscaled
                (`scaleRewards`), on every token of completion i;
   rloo:        A_i = r_i - mean_{j≠i} r_j (Ahmadian et al. 2024), on every token;
   reinforce++: per-token rewards -β (log π_old - log π_ref) (k1) plus r on the last token, the
                return G_t = Σ_{s>=t} r_s, whitened over the tokens of the whole batch (Hu 2025;
                OpenRLHF). The KL is then in the reward and not in the loss.
3. One pass in minibatches of `batchSize` over the per-token loss
     l_t = w_t · max(-ρ_t A_t, -clip(ρ_t, 1 - ε, 1 + ε_high) A_t) + β (exp(d_t) - d_t - 1),
     ρ_t = π / π_old,  d_t = log π_ref - log π,
   ε = `clip`, ε_high = `clipHigh` (DAPO's clip-higher; unset: ε), w the truncated IS weight
   (below; 1 without it), β = `klCoef` (0 with reinforce++), aggregated by `lossAggregation`
   (verl's `agg_loss`): token-mean Σ l / N_tokens (DAPO), seq-mean-token-mean the mean over
   sequences of their token means (DeepSeekMath), seq-mean-token-sum-norm
   Σ l / (N_seq · maxNewTokens) (Dr.GRPO, Liu et al. 2025); counts over the whole minibatch.
   β > 0 loads the reference model.

log π_old: when a step's samples fit one minibatch (rolloutBatchSize × G <= batchSize) and
generation is synchronous, the one optimizer step starts from the policy that sampled them, so
the ratio takes the loss pass's own logprobs, detached (TRL's GRPOTrainer with one iteration).
Otherwise the servers' behaviour logprobs with `async: true`, the samples' own when the trainer
generated them (`rollout.engine: trainer`), else a forward pass. Always a forward pass with
`rolloutCorrection` (w_t = min(π_old / π_rollout, C), Yao et al. 2025,
`online_steps.corrected_old_logprobs`), and for reinforce++ with β > 0 (its rewards need
π_old before the loss pass). With `logprobTemperature: sampling` every policy and reference
pass divides the logits by the sampling temperature, and π_old comes from the samples' own
logprobs (at T = 1) only when that temperature is 1.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import torch
from torch import nn

from rlhf_trainer.algos.advantages import (
    group_advantages,
    group_all_equal,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_trainer.algos.policy_losses import aggregate_loss, grpo_loss, kl_k3
from rlhf_trainer.algos.reward_shaping import all_equal, overlong_penalty
from rlhf_trainer.config import GRPOOptions
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PromptRow
from rlhf_trainer.models.online_models import load_reference
from rlhf_trainer.online.experience import Batch, Experience, collate_samples, policy_logprobs
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.online.grpo_sampling import StepGroups, gather_scores, pick_groups, sample_groups
from rlhf_trainer.online.loop import run_online, shard
from rlhf_trainer.online.setup import OnlineSetup
from rlhf_trainer.online.steps import (
    ActorOnly,
    MinibatchTrainer,
    check_fits,
    corrected_old_logprobs,
    correction_on,
    forward_in_chunks,
    rank_rows,
    rename,
    scoring_temperature,
)
from rlhf_trainer.rollout.client import Sampling, generated_tokens
from rlhf_trainer.runtime.distributed import all_reduce_sum
from rlhf_trainer.training.loop import build_optimizer

log = logging.getLogger(__name__)


class GRPO(ActorOnly):
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
        # reinforce++ puts the KL in the reward (k1, on π_old), not in the loss.
        self.kl_in_reward = opts.advantage_estimator == "reinforce++" and opts.kl_coef > 0
        self.temperature = scoring_temperature(opts)
        self.correction = correction_on(opts, setup.async_)
        self.per_sample = opts.loss_aggregation != "token-mean"
        samples = opts.rollout_batch_size * opts.num_generations
        optimizer_steps = setup.inputs.total_steps * (samples // hp.batch_size)
        self.optimizer, self.scheduler = build_optimizer(setup.actor, hp, optimizer_steps)
        check_fits(setup, [setup.actor])
        # A step's samples in one minibatch: one optimizer step, taken from the very policy
        # that sampled them (synchronous mode), so π_old needs no forward pass of its own.
        self.one_update = samples <= hp.batch_size and not setup.async_
        self.trainer = MinibatchTrainer(setup, setup.actor, self.optimizer, self.scheduler)

    def train(self, step: int, rollouts: StepRollouts) -> tuple[dict[str, float], bool]:
        setup, opts, g = self.setup, self.opts, self.opts.num_generations
        rounds = opts.dynamic_sampling_rounds if opts.dynamic_sampling else 0
        world = setup.ctx.world_size
        groups = sample_groups(rollouts, self._rewards, g, self.prompts_per_step, rounds, world)
        chosen = list(range(self.prompts_per_step))
        live = torch.ones(self.prompts_per_step, dtype=torch.bool)
        if opts.dynamic_sampling:
            chosen, live = pick_groups(groups.rewards, g, self.prompts_per_step)
        metrics = self._step_metrics(groups, int(live.sum()))
        if not opts.dynamic_sampling and all_equal(groups.rewards):  # every rank's rewards
            log.warning(
                "Every reward of step %d was %.4g: every advantage is 0, so the step carries no "
                "reward signal (a reward function or model that cannot tell samples apart?)",
                step + 1, float(groups.rewards[0]),
            )  # fmt: skip
        if not live.any():
            log.warning(
                "Skipped the update of step %d: every group of its %d sampling round(s) had "
                "equal rewards (dynamicSamplingRounds %d)",
                step + 1, groups.rounds + 1, opts.dynamic_sampling_rounds,
            )  # fmt: skip
            return metrics, False
        exp, extra = self._experience(groups, chosen, live)
        rng = random.Random(setup.inputs.config.hyperparameters.seed + step)
        trained = self.trainer.run(exp, self._loss, rng, per_sample=self.per_sample)
        return metrics | extra | rename(trained), True

    def _rewards(self, rollouts: StepRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rewards with the overlong penalty) of all of `rollouts`' samples, every
        rank's share scored where it lives and gathered (collective)."""
        setup, penalty = self.setup, self.opts.overlong_penalty
        mine = shard(rollouts.samples, setup.ctx)
        local = setup.reward.score(mine, rollouts.prompts).to(setup.ctx.device)
        scores = gather_scores(local).cpu()
        if penalty is None:
            return scores, scores
        lengths = torch.tensor([generated_tokens(s) for s in rollouts.samples])
        shaped = overlong_penalty(lengths, self.opts.max_new_tokens, penalty.buffer, penalty.factor)
        return scores, scores + shaped

    def _step_metrics(self, groups: StepGroups, kept: int) -> dict[str, float]:
        scores = groups.scores
        out = groups.metrics | {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        }
        if self.opts.overlong_penalty is not None:
            out["overlong_penalised"] = float((groups.rewards < scores).sum())
        if self.opts.dynamic_sampling:
            dropped = group_all_equal(groups.rewards, self.opts.num_generations)
            out["groups_dropped"] = float(dropped.sum())
            out["groups_kept"] = float(kept)
            out["sampling_rounds"] = float(groups.rounds)
        return out

    def _experience(
        self, groups: StepGroups, chosen: list[int], live: torch.Tensor
    ) -> tuple[Experience, dict[str, float]]:
        """This rank's share of the chosen groups, with log π_old, log π_ref and advantages;
        the not-live groups' response masks zeroed. Collective."""
        setup, g = self.setup, self.opts.num_generations
        device = setup.ctx.device
        samples = [groups.samples[i * g + j] for i in chosen for j in range(g)]
        rewards = groups.rewards.view(-1, g)[chosen].reshape(-1)
        scores = groups.scores.view(-1, g)[chosen].reshape(-1)
        rows = live.repeat_interleave(g)
        batch = collate_samples(
            shard(samples, setup.ctx), int(setup.tokenizer.pad_token_id), device
        )
        keep = rank_rows(rows, setup.ctx).to(device=device, dtype=batch.response_mask.dtype)
        batch = replace(batch, response_mask=batch.response_mask * keep.unsqueeze(-1))
        old, weights, extra = self._old_logprobs(batch)
        ref = None
        if self.reference is not None:
            ref = self._logprobs(self.reference, batch)
        exp = Experience(
            batch=batch,
            old_logprobs=old,
            advantages=self._advantages(rewards, rows, batch, old, ref),
            scores=rank_rows(scores, setup.ctx).to(device),
            ref_logprobs=ref,
            is_weights=weights,
        )
        return exp, extra

    def _logprobs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """log π of the sampled tokens (B, R) at the scoring temperature, no grad, in chunks."""
        t = self.temperature
        return forward_in_chunks(
            self.setup, batch, lambda b: policy_logprobs(model, b, False, t)[0]
        )

    def _old_logprobs(
        self, batch: Batch
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
        """(log π_old or None for the loss pass's own, truncated IS weights or None, their
        metrics), as the module docstring says."""
        setup = self.setup
        if self.correction:
            cap = self.opts.rollout_correction_cap
            return corrected_old_logprobs(setup, batch, self.temperature, cap)
        if self.one_update and not self.kl_in_reward:
            return None, None, {}
        if (setup.async_ or setup.sampled_by_policy) and self.temperature == 1.0:
            return batch.behaviour_logprobs, None, {}
        return self._logprobs(setup.actor, batch), None, {}

    def _advantages(
        self,
        rewards: torch.Tensor,
        live: torch.Tensor,
        batch: Batch,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
    ) -> torch.Tensor:
        """This rank's advantages: (B,) for grpo and rloo, (B, R) for reinforce++. rewards,
        live: (N,) over the step's chosen samples (all ranks); only live groups count."""
        opts, ctx = self.opts, self.setup.ctx
        if opts.advantage_estimator == "reinforce++":
            return self._reinforce_pp(rank_rows(rewards, ctx), batch, old, ref)
        g = opts.num_generations
        if opts.advantage_estimator == "rloo":
            centred = rloo_advantages(rewards[live], g)
        else:
            centred = group_advantages(rewards[live], g, opts.scale_rewards)
        full = torch.zeros(rewards.numel(), dtype=torch.float32)
        full[live] = centred.float()
        return rank_rows(full, ctx).to(ctx.device)

    def _reinforce_pp(
        self, scores: torch.Tensor, batch: Batch, old: torch.Tensor | None, ref: torch.Tensor | None
    ) -> torch.Tensor:
        """REINFORCE++ (`advantages.reinforce_pp_advantages`), whitened with every rank's
        returns (collective)."""
        device, mask = self.setup.ctx.device, batch.response_mask
        if self.kl_in_reward:
            assert old is not None and ref is not None  # _old_logprobs: a forward pass
            logprobs, ref_logprobs, beta = old, ref, self.opts.kl_coef
        else:
            logprobs = ref_logprobs = torch.zeros_like(mask)
            beta = 0.0

        def global_sums(sums: torch.Tensor) -> torch.Tensor:
            return torch.tensor(all_reduce_sum(sums.tolist(), device), dtype=torch.float64)

        return reinforce_pp_advantages(
            scores.to(device), logprobs, ref_logprobs, mask, beta, global_sums
        )

    def _loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch: (its share of the aggregated loss, summed diagnostics)."""
        opts = self.opts
        mask = exp.batch.response_mask
        logprobs, entropy = policy_logprobs(self.setup.actor, exp.batch, True, self.temperature)
        old = logprobs.detach() if exp.old_logprobs is None else exp.old_logprobs
        beta = 0.0 if self.kl_in_reward else opts.kl_coef
        token_loss, clipped = grpo_loss(
            logprobs, old, exp.ref_logprobs, exp.advantages, mask, opts.clip, beta,
            clip_high=opts.clip_high, weights=exp.is_weights,
        )  # fmt: skip
        loss, _ = aggregate_loss(token_loss, mask, opts.loss_aggregation, opts.max_new_tokens)
        assert entropy is not None
        sums = {
            "clipped": self._diagnostic(clipped.float(), mask),
            "entropy": self._diagnostic(entropy.detach(), mask),
        }
        if exp.ref_logprobs is not None:
            kl = kl_k3(logprobs.detach(), exp.ref_logprobs)
            sums["kl"] = self._diagnostic(kl, mask)
        return loss, sums

    def _diagnostic(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """A per-token quantity summed as the trainer divides it: over tokens (token-mean),
        else over sequences of their token means (so the result is a per-sequence mean)."""
        if not self.per_sample:
            return float((x * mask).sum())
        per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return float(per_seq.sum())


def run_grpo(inputs: StageInputs[PromptRow]) -> None:
    options = inputs.config.grpo or GRPOOptions()
    run_online(inputs, GRPO, options.num_generations)
