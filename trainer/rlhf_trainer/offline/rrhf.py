"""The `rrhf` stage (offline): rank k responses per query by their rewards, with FSDP2.

Each query's k responses come from the dataset. Their rewards come from the data, from a
registered reward function (`reward.function`, scored in preflight), or from the reward model of
an earlier `reward` stage (`reward.from`, scored here before training, each rank its share).
Per query (`losses.rrhf_loss`): length-normalised scores p_i = logp_i / |y_i|^lengthPenalty, the
ranking hinge over pairs with r_i < r_j, and the SFT loss on the best response; the total is
rrhfWeight * L_rank + L_sft, averaged over the queries of the global batch.

Logged: loss, rank_loss, sft_loss; held out: eval_loss, eval_rank_loss, eval_sft_loss.
With `rrhf.online` the responses are sampled from the current policy instead (`online/rrhf.py`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_trainer.algos.losses import rrhf_loss, sequence_logprobs
from rlhf_trainer.config import RRHFOptions
from rlhf_trainer.data.batching import Example, collate, tokenize_sft
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import RankedRow, SFTRow
from rlhf_trainer.models.causal_lm import load_tokenizer, load_trainable_lm
from rlhf_trainer.models.reward_model import load_reward_model
from rlhf_trainer.runtime.distributed import DistContext
from rlhf_trainer.training.loop import (
    StepResult,
    Trainable,
    backward_micro_batches,
    evaluate_rounds,
    run_stage,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryExample:
    """One query's k tokenized responses and their rewards."""

    responses: list[Example]
    rewards: list[float]


def tokenize_queries(rows: list[RankedRow], tokenizer: Any, max_length: int) -> list[QueryExample]:
    flat = [SFTRow(r.prompt, y, chat=r.chat, where=r.where) for r in rows for y in r.responses]
    examples = iter(tokenize_sft(flat, tokenizer, max_length) if flat else [])
    out = []
    for row in rows:
        assert row.rewards is not None
        out.append(QueryExample([next(examples) for _ in row.responses], list(row.rewards)))
    return out


def score_rows(
    rows: list[RankedRow], path: str, ctx: DistContext, max_length: int
) -> list[RankedRow]:
    """Rows with every response scored by the reward model in `path`: each rank scores every
    world_size-th response and the scores are summed over ranks."""
    scorer = load_reward_model(path, ctx.device, max_length)
    flat = [(i, r.prompt, y) for i, r in enumerate(rows) for y in r.responses]
    scores = torch.zeros(len(flat), dtype=torch.float64, device=ctx.device)
    mine = list(range(ctx.rank, len(flat), ctx.world_size))
    chat = any(r.chat for r in rows)
    values = scorer.score([flat[j][1] for j in mine], [flat[j][2] for j in mine], chat=chat)
    scores[mine] = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(scores)
    it = iter(scores.tolist())
    return [dataclasses.replace(r, rewards=tuple(next(it) for _ in r.responses)) for r in rows]


def padded(values: torch.Tensor, counts: list[int], fill: float) -> torch.Tensor:
    """Flat per-response values -> (N, K_max), `fill` past each query's count."""
    out = torch.full((len(counts), max(counts)), fill, dtype=values.dtype, device=values.device)
    for i, chunk in enumerate(torch.split(values, counts)):
        out[i, : len(chunk)] = chunk
    return out


class RRHFObjective:
    def __init__(
        self,
        model: nn.Module,
        queries: list[QueryExample],
        eval_queries: list[QueryExample],
        inputs: StageInputs[RankedRow],
        ctx: DistContext,
        pad_id: int,
    ) -> None:
        self.model, self.queries, self.eval_queries = model, queries, eval_queries
        self.inputs, self.ctx, self.pad_id = inputs, ctx, pad_id
        self.options = inputs.config.rrhf or RRHFOptions()

    def _sums(
        self, queries: list[QueryExample], weights: list[float], n_queries: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        flat = [e for q in queries for e in q.responses]
        t = {k: v.to(self.ctx.device) for k, v in collate(flat, self.pad_id).items()}
        logits = self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        logp, lengths = sequence_logprobs(logits, t["labels"])
        counts = [len(q.responses) for q in queries]
        rewards = torch.tensor([r for q in queries for r in q.rewards], device=logp.device)
        valid = padded(torch.ones_like(logp), counts, 0.0).bool()
        out = rrhf_loss(
            padded(logp, counts, 0.0),
            padded(lengths, counts, 1.0),
            padded(rewards, counts, 0.0),
            length_penalty=self.options.length_penalty,
            valid=valid,
        )
        w = torch.tensor(weights, device=logp.device)
        per_query = self.options.rrhf_weight * out.rank + out.sft
        sums = {
            "rank_loss": float((out.rank.detach() * w).sum()),
            "sft_loss": float((out.sft.detach() * w).sum()),
            "tokens": float(t["attention_mask"].sum()),
        }
        return (per_query * w).sum() / n_queries, sums

    def train_step(self, batch: list[int]) -> StepResult:
        n = float(len(batch))
        sums = backward_micro_batches(
            self.model,
            batch,
            self.ctx,
            self.inputs.config.hyperparameters.gradient_accumulation,
            lambda idx: self._sums([self.queries[i] for i in idx], [1.0] * len(idx), n),
            1.0,
        )
        metrics = {"rank_loss": sums["rank_loss"] / n, "sft_loss": sums["sft_loss"] / n}
        return StepResult(sums["loss"], sums["tokens"], metrics)

    def evaluate(self) -> dict[str, float]:
        n = len(self.eval_queries)
        if not n:
            return {}

        def step(indices: list[int], real: list[bool]) -> dict[str, float]:
            queries = [self.eval_queries[i] for i in indices]
            loss, sums = self._sums(queries, [float(r) for r in real], 1.0)
            return {"loss": float(loss), "rank": sums["rank_loss"], "sft": sums["sft_loss"]}

        sums = evaluate_rounds(self.model, n, self.ctx, self.inputs.micro_batch, step)
        return {
            "eval_loss": sums["loss"] / n,
            "eval_rank_loss": sums["rank"] / n,
            "eval_sft_loss": sums["sft"] / n,
        }


def run_rrhf(ranked: StageInputs[RankedRow]) -> None:
    """Train the policy with RRHF on ranked responses, then write `<output_dir>/final`.
    Collective. (`rrhf.online` runs `online.rrhf.run_online_rrhf` instead: the stage table.)"""
    inputs = ranked
    config, hp = inputs.config, inputs.config.hyperparameters

    def prepare(ctx: DistContext) -> Trainable:
        train, held_out = ranked.train_rows, ranked.eval_rows
        if inputs.reward_model_ref is not None:
            train = score_rows(train, inputs.reward_model_ref, ctx, hp.max_length)
            held_out = score_rows(held_out, inputs.reward_model_ref, ctx, hp.max_length)
            log.info(
                "Scored %d responses with the reward model", sum(len(r.responses) for r in train)
            )
        tokenizer: Any = load_tokenizer(config.model, inputs.model_ref)
        queries = tokenize_queries(train, tokenizer, hp.max_length)
        eval_queries = tokenize_queries(held_out, tokenizer, hp.max_length)
        model, dtype, export = load_trainable_lm(config, inputs.model_ref, ctx)
        pad_id = int(tokenizer.pad_token_id)
        objective = RRHFObjective(model, queries, eval_queries, ranked, ctx, pad_id)
        return Trainable(model, objective, tokenizer, dtype, export, eval_at_start=True)

    run_stage(ranked, prepare, "queries")
