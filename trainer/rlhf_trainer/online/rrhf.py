"""Online RRHF (Yuan et al. 2023): the k responses per query come from the current policy.

Per step: `samplesPerPrompt` (k) responses to each of `rolloutBatchSize` prompts from the rollout
servers (`temperature`, `topP`), scored by the stage's reward source (reward model, registered
function or judge, as for ppo and grpo); each rank takes whole queries. Then one pass in
minibatches of `batchSize` queries, a query's k responses always together, of the RRHF loss
(`losses.rrhf_loss`: p_i = log π(y_i | x) / |y_i|^lengthPenalty, the ranking hinge over pairs
with r_i < r_j, the SFT loss on the best-rewarded response; rrhfWeight * L_rank + L_sft averaged
over the queries). The servers get the new weights after every step (`online/loop.py`).

Logged: reward_mean, reward_std, reward_best_mean (the best of each query's k), loss,
rank_loss, sft_loss; held out: eval_reward_mean of greedy answers.
"""

from __future__ import annotations

import random

import torch

from rlhf_trainer.algos.losses import rrhf_loss
from rlhf_trainer.config import RRHFOptions
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PromptRow
from rlhf_trainer.online.experience import Experience, collate_samples, policy_logprobs
from rlhf_trainer.online.feed import StepRollouts
from rlhf_trainer.online.grpo_sampling import gather_scores
from rlhf_trainer.online.loop import run_online, shard
from rlhf_trainer.online.setup import OnlineSetup
from rlhf_trainer.online.steps import ActorOnly, MinibatchTrainer, check_fits
from rlhf_trainer.rollout.client import Sampling
from rlhf_trainer.training.loop import build_optimizer


def ranking_inputs(
    logprobs: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token logprobs of query-major samples -> `rrhf_loss` inputs, one row per query.

    logprobs, response_mask: (Q * k, R), 0 past each response; rewards: (Q * k,), a query's k
    samples consecutive. Returns (summed response logprobs, response lengths, rewards), each
    (Q, k) float32.
    """
    logps = (logprobs * response_mask).sum(dim=1).view(-1, k)
    lengths = response_mask.sum(dim=1).view(-1, k)
    return logps.float(), lengths.float(), rewards.float().view(-1, k)


class OnlineRRHF(ActorOnly):
    def __init__(self, setup: OnlineSetup) -> None:
        config = setup.inputs.config
        self.setup, self.opts = setup, config.rrhf or RRHFOptions()
        opts, hp = self.opts, config.hyperparameters
        self.sampling = Sampling(
            n=opts.samples_per_prompt,
            max_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
        )
        self.prompts_per_step = opts.rollout_batch_size
        optimizer_steps = setup.inputs.total_steps * (opts.rollout_batch_size // hp.batch_size)
        self.optimizer, self.scheduler = build_optimizer(setup.actor, hp, optimizer_steps)
        check_fits(setup, [setup.actor])
        self.trainer = MinibatchTrainer(setup, setup.actor, self.optimizer, self.scheduler)

    def train(self, step: int, rollouts: StepRollouts) -> tuple[dict[str, float], bool]:
        setup, k = self.setup, self.opts.samples_per_prompt
        mine = shard(rollouts.samples, setup.ctx)  # whole queries: preflight checks the split
        scores = setup.reward.score(mine, rollouts.prompts)
        everyone = gather_scores(scores.to(setup.ctx.device)).cpu()
        batch = collate_samples(mine, int(setup.tokenizer.pad_token_id), setup.ctx.device)
        exp = Experience(
            batch=batch,
            old_logprobs=None,  # RRHF takes no importance ratio
            advantages=torch.zeros(len(mine), device=setup.ctx.device),  # unused
            scores=scores.to(setup.ctx.device),  # what the responses are ranked by
        )
        rng = random.Random(setup.inputs.config.hyperparameters.seed + step)
        metrics = self.trainer.run(exp, self._loss, rng, unit=k)
        return metrics | {
            "reward_mean": float(everyone.mean()),
            "reward_std": float(everyone.std()) if everyone.numel() > 1 else 0.0,
            "reward_best_mean": float(everyone.view(-1, k).max(dim=1).values.mean()),
        }, True

    def _loss(self, exp: Experience) -> tuple[torch.Tensor, dict[str, float]]:
        """Whole queries: (summed loss, summed rank and SFT losses)."""
        opts, mask = self.opts, exp.batch.response_mask
        logprobs, _ = policy_logprobs(self.setup.actor, exp.batch)
        logps, lengths, rewards = ranking_inputs(
            logprobs, mask, exp.scores, opts.samples_per_prompt
        )
        out = rrhf_loss(logps, lengths, rewards, length_penalty=opts.length_penalty)
        per_query = opts.rrhf_weight * out.rank + out.sft
        rank, sft = float(out.rank.detach().sum()), float(out.sft.detach().sum())
        return per_query.sum(), {"rank_loss": rank, "sft_loss": sft}


def run_online_rrhf(inputs: StageInputs[PromptRow]) -> None:
    options = inputs.config.rrhf or RRHFOptions()
    run_online(inputs, OnlineRRHF, options.samples_per_prompt)
