"""Supervised fine-tuning with FSDP2: cross-entropy on response tokens only.

One optimizer step consumes `batchSize` examples over all ranks: `gradientAccumulation`
micro-steps of `batchSize / (worldSize * gradientAccumulation)` examples per rank. The loss is
summed over response tokens and divided by the response-token count of the whole global batch, so
the gradient does not depend on how the batch is split (see `losses.sft_loss_sum`). The loop,
checkpoints and progress are the shared ones of `loop.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from rlhf_trainer.algos.losses import IGNORE_INDEX, count_targets, sft_loss_sum_at, sft_scored
from rlhf_trainer.data.batching import Example, collate, n_targets, tokenize_sft
from rlhf_trainer.data.inputs import SFTInputs
from rlhf_trainer.data.packed import kept_logits
from rlhf_trainer.models.causal_lm import load_tokenizer, load_trainable_lm
from rlhf_trainer.runtime.distributed import DistContext
from rlhf_trainer.training.loop import (
    StepResult,
    Trainable,
    backward_micro_batches,
    evaluate_rounds,
    run_stage,
)

log = logging.getLogger(__name__)


def tensors(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


class SFTObjective:
    """Token-mean cross-entropy over the response tokens of each global batch."""

    def __init__(
        self,
        model: nn.Module,
        examples: list[Example],
        eval_examples: list[Example],
        inputs: SFTInputs,
        ctx: DistContext,
        pad_id: int,
    ) -> None:
        self.model, self.examples, self.eval_examples = model, examples, eval_examples
        self.ctx, self.pad_id, self.micro = ctx, pad_id, inputs.micro_batch
        self.grad_accum = inputs.config.hyperparameters.gradient_accumulation

    def _loss_sum(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        t = tensors(batch, self.pad_id, self.ctx.device)
        keep, targets = sft_scored(t["labels"])  # the output layer runs at these alone
        logits = kept_logits(
            self.model,
            keep,
            lambda: self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]),
        )
        loss = sft_loss_sum_at(logits, targets)
        return loss, {
            "tokens": float(t["attention_mask"].sum()),
            "targets": count_targets(t["labels"]),
        }

    def train_step(self, batch: list[int]) -> StepResult:
        global_targets = max(1, sum(n_targets(self.examples[i]) for i in batch))
        sums = backward_micro_batches(
            self.model,
            batch,
            self.ctx,
            self.grad_accum,
            lambda idx: self._loss_sum([self.examples[i] for i in idx]),
            1.0 / global_targets,
        )
        # trained_tokens: the response tokens scored, where the output layer runs (roofline).
        return StepResult(sums["loss"] / global_targets, sums["tokens"],
                          {"trained_tokens": float(global_targets)})  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Mean response-token loss over the held-out examples."""
        if not self.eval_examples:
            return {}
        dummy = Example([self.pad_id, self.pad_id], [IGNORE_INDEX, IGNORE_INDEX])

        def step(indices: list[int], real: list[bool]) -> dict[str, float]:
            batch = [
                self.eval_examples[i] if r else dummy for i, r in zip(indices, real, strict=True)
            ]
            loss, sums = self._loss_sum(batch)
            return {"loss": float(loss), "targets": sums["targets"]}

        sums = evaluate_rounds(self.model, len(self.eval_examples), self.ctx, self.micro, step)
        return {"eval_loss": sums["loss"] / max(sums["targets"], 1.0)}


def run_sft(inputs: SFTInputs) -> None:
    """Train, then write `<output_dir>/final`. Collective: run on every rank."""
    hp = inputs.config.hyperparameters

    def prepare(ctx: DistContext) -> Trainable:
        tokenizer: Any = load_tokenizer(inputs.config.model, inputs.model_ref)
        examples = tokenize_sft(inputs.train_rows, tokenizer, hp.max_length)
        held_out = (
            tokenize_sft(inputs.eval_rows, tokenizer, hp.max_length) if inputs.eval_rows else []
        )
        model, dtype, export = load_trainable_lm(inputs.config, inputs.model_ref, ctx)
        pad_id = int(tokenizer.pad_token_id)
        objective = SFTObjective(model, examples, held_out, inputs, ctx, pad_id)
        return Trainable(model, objective, tokenizer, dtype, export)

    run_stage(inputs, prepare, "examples")
