"""The `dpo` stage: Direct Preference Optimization against a frozen reference, with FSDP2.

Sequence log-probs are summed over completion tokens (`losses.sequence_logprobs`) for the chosen
and the rejected response of each pair, for the policy and the reference; `losses.dpo_loss` gives
the per-pair loss (sigmoid, IPO or hinge; label smoothing for conservative DPO), averaged over the
global batch. A pair runs as one row that holds its prompt once (`data/packed.py`) where the model's
attention takes a 4D mask, else as two padded rows. The reference is the initial policy: a
second, frozen FSDP-sharded copy, or with LoRA the policy itself with its adapters disabled.
`dpo.precomputeRefLogprobs` scores every pair with it once before training and frees it.

Logged: loss, reward_accuracy (chosen implicit reward above rejected, ties half), chosen_reward,
rejected_reward and margin (beta * log-ratios, batch means), and sft_loss when `dpo.sftWeight` > 0;
held out, before training and at each checkpoint: eval_loss, eval_reward_accuracy, eval_margin.

`dpo.sftWeight` α > 0 is RPO (Pang et al. 2024): each pair's loss gains α times the chosen
response's NLL per token (`preference_losses.dpo_nll_term`), which holds log π(y_w) up where
plain DPO lets it fall while the margin widens.

Dropout is off in the policy and the reference (`determinism.disable_dropout`, TRL's
`disable_dropout=True` default): the policy's passes run in train mode, and with LoRA the
reference is the policy itself, so a dropout mask per pass would make the log-ratios noise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rlhf_trainer.algos.losses import IGNORE_INDEX, dpo_loss, pairwise_accuracy, sequence_logprobs
from rlhf_trainer.algos.preference_losses import dpo_nll_term
from rlhf_trainer.config import DPOOptions
from rlhf_trainer.data.batching import PairExample, tokenize_pairs
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.packed import (
    gathered_logprobs,
    mask_dtype,
    pack,
    packed_logits,
    supports_packing,
)
from rlhf_trainer.data.readers import PreferenceRow
from rlhf_trainer.models.causal_lm import (
    Exporter,
    load_causal_lm,
    load_tokenizer,
    load_trainable_lm,
)
from rlhf_trainer.offline.reward import pair_tensors
from rlhf_trainer.runtime.determinism import disable_dropout
from rlhf_trainer.runtime.distributed import DistContext, shard_model
from rlhf_trainer.training.loop import (
    StepResult,
    Trainable,
    backward_micro_batches,
    evaluate_rounds,
    run_stage,
)

log = logging.getLogger(__name__)

# Sequence log-probs of a batch of pairs: (chosen (B,), rejected (B,), chosen tokens, rejected).
PairLogps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def packed_pair_logprobs(
    model: nn.Module, pairs: list[PairExample], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.sequence_logprobs` of the chosen sequences, then the rejected ones ((2B,) each:
    summed logprobs, scored tokens), from one packed row per pair that holds their shared
    prompt once (`data/packed.py`)."""
    sequences = [p.chosen.input_ids for p in pairs] + [p.rejected.input_ids for p in pairs]
    labels = [p.chosen.labels for p in pairs] + [p.rejected.labels for p in pairs]
    b = len(pairs)
    packed = pack(sequences, [[i, i + b] for i in range(b)], pad_id, device, model,
                  mask_dtype(model))  # fmt: skip
    targets = torch.full(packed.source.shape, IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(labels):
        targets[i, : len(row) - 1] = torch.tensor(row[1:], dtype=torch.long)
    targets = targets.to(device)
    scored = targets != IGNORE_INDEX
    # The output layer runs once per scored position: the position before both responses,
    # scored in the chosen and the rejected sequence, once for the two.
    keep, kept_row = torch.unique(packed.source[scored], return_inverse=True)
    source = torch.zeros_like(packed.source)
    source[scored] = kept_row
    per_token = gathered_logprobs(packed_logits(model, packed, keep=keep), source, targets,
                                  IGNORE_INDEX)  # fmt: skip
    return per_token.sum(-1), scored.sum(-1).float()


class DPOObjective:
    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module | None,
        pairs: list[PairExample],
        eval_pairs: list[PairExample],
        inputs: StageInputs[PreferenceRow],
        ctx: DistContext,
        pad_id: int,
    ) -> None:
        self.model, self.reference = model, reference
        self.splits = {"train": pairs, "eval": eval_pairs}
        self.inputs, self.ctx, self.pad_id = inputs, ctx, pad_id
        self.options = inputs.config.dpo or DPOOptions()
        self.tables: dict[str, torch.Tensor] = {}  # split -> (n, 2) reference log-probs

    def _logps(self, model: nn.Module, pairs: list[PairExample]) -> PairLogps:
        if supports_packing(model):
            logp, n = packed_pair_logprobs(model, pairs, self.pad_id, self.ctx.device)
        else:
            t = pair_tensors(pairs, self.pad_id, self.ctx.device)
            logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
            logp, n = sequence_logprobs(logits, t["labels"])
        (chosen, rejected), (n_c, n_r) = logp.chunk(2), n.chunk(2)
        return chosen, rejected, n_c, n_r

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The frozen reference: its own model, or the LoRA policy with adapters off."""
        if self.reference is not None:
            yield self.reference
            return
        with self.model.disable_adapter():  # type: ignore[operator]
            yield self.model

    @torch.no_grad()
    def _ref_logps(self, split: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if split in self.tables:
            rows = self.tables[split][indices].float().to(self.ctx.device)
            return rows[:, 0], rows[:, 1]
        with self._reference() as ref:
            chosen, rejected, _, _ = self._logps(ref, [self.splits[split][i] for i in indices])
        return chosen, rejected

    def _table(self, split: str) -> torch.Tensor:
        """(n, 2) reference log-probs of a split's pairs; each rank scores its share."""
        pairs = self.splits[split]
        table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=self.ctx.device)

        def step(indices: list[int], real: list[bool]) -> dict[str, float]:
            chosen, rejected = self._ref_logps(split, indices)
            for j, (i, r) in enumerate(zip(indices, real, strict=True)):
                if r:
                    table[i] = torch.stack([chosen[j], rejected[j]]).double()
            return {"pairs": float(sum(real))}

        if pairs:
            evaluate_rounds(self.model, len(pairs), self.ctx, self.inputs.micro_batch, step)
            dist.all_reduce(table)  # each rank filled its own rows; the others hold 0
        return table

    def precompute(self) -> None:
        """Reference log-probs of every pair, once; then the reference model is freed."""
        self.tables = {split: self._table(split) for split in self.splits}
        self.reference = None
        log.info("Precomputed reference log-probs of %d pairs", sum(map(len, self.splits.values())))

    def _sums(
        self, split: str, indices: list[int], weights: list[float], n_pairs: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pairs = [self.splits[split][i] for i in indices]
        chosen, rejected, n_c, n_r = self._logps(self.model, pairs)
        ref_c, ref_r = self._ref_logps(split, indices)
        o = self.options
        out = dpo_loss(
            chosen, rejected, ref_c, ref_r,
            beta=o.beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing,
            chosen_lengths=n_c, rejected_lengths=n_r,
        )  # fmt: skip
        w = torch.tensor(weights, device=chosen.device)
        losses = out.losses
        if o.sft_weight > 0:
            nll = dpo_nll_term(chosen, n_c)
            losses = losses + o.sft_weight * nll
        sums = {
            "correct": float(
                (pairwise_accuracy(out.chosen_rewards, out.rejected_rewards) * w).sum()
            ),
            "chosen_reward": float((out.chosen_rewards * w).sum()),
            "rejected_reward": float((out.rejected_rewards * w).sum()),
            "tokens": float(
                sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
            ),
        }
        if o.sft_weight > 0:
            sums["sft_loss"] = float((nll.detach() * w).sum())
        return (losses * w).sum() / n_pairs, sums

    def train_step(self, batch: list[int]) -> StepResult:
        n = float(len(batch))
        sums = backward_micro_batches(
            self.model,
            batch,
            self.ctx,
            self.inputs.config.hyperparameters.gradient_accumulation,
            lambda idx: self._sums("train", idx, [1.0] * len(idx), n),
            1.0,
        )
        chosen, rejected = sums["chosen_reward"] / n, sums["rejected_reward"] / n
        metrics = {
            "reward_accuracy": sums["correct"] / n,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
            "margin": chosen - rejected,
        }
        if "sft_loss" in sums:
            metrics["sft_loss"] = sums["sft_loss"] / n
        return StepResult(sums["loss"], sums["tokens"], metrics)

    def evaluate(self) -> dict[str, float]:
        n = len(self.splits["eval"])
        if not n:
            return {}

        def step(indices: list[int], real: list[bool]) -> dict[str, float]:
            loss, sums = self._sums("eval", indices, [float(r) for r in real], 1.0)
            margin = sums["chosen_reward"] - sums["rejected_reward"]
            return {"loss": float(loss), "correct": sums["correct"], "margin": margin}

        sums = evaluate_rounds(self.model, n, self.ctx, self.inputs.micro_batch, step)
        return {
            "eval_loss": sums["loss"] / n,
            "eval_reward_accuracy": sums["correct"] / n,
            "eval_margin": sums["margin"] / n,
        }


def load_reference(inputs: StageInputs[Any], ctx: DistContext) -> nn.Module | None:
    """A frozen, sharded copy of the initial policy; None with LoRA (adapters off instead)."""
    if inputs.config.lora is not None:
        return None
    reference, _ = load_causal_lm(inputs.config.model, inputs.model_ref)
    reference.eval()
    disable_dropout(reference)  # eval mode suffices; this also covers a stray .train()
    reference.requires_grad_(False)
    shard_model(reference, ctx.bf16)
    return reference


def load_models(
    inputs: StageInputs[Any], ctx: DistContext
) -> tuple[nn.Module, torch.dtype, Exporter, nn.Module | None]:
    """The sharded policy (its saved dtype and exporter) and the reference (`load_reference`),
    both with dropout off."""
    model, dtype, export = load_trainable_lm(inputs.config, inputs.model_ref, ctx)
    disable_dropout(model)
    return model, dtype, export, load_reference(inputs, ctx)


def run_dpo(inputs: StageInputs[PreferenceRow]) -> None:
    """Train the policy with DPO, then write `<output_dir>/final`. Collective."""
    config, hp = inputs.config, inputs.config.hyperparameters

    def prepare(ctx: DistContext) -> Trainable:
        tokenizer: Any = load_tokenizer(config.model, inputs.model_ref)
        pairs = tokenize_pairs(inputs.train_rows, tokenizer, hp.max_length)
        held_out = (
            tokenize_pairs(inputs.eval_rows, tokenizer, hp.max_length) if inputs.eval_rows else []
        )
        model, dtype, export, reference = load_models(inputs, ctx)
        pad_id = int(tokenizer.pad_token_id)
        objective = DPOObjective(model, reference, pairs, held_out, inputs, ctx, pad_id)
        if (config.dpo or DPOOptions()).precompute_ref_logprobs:
            objective.precompute()
        return Trainable(model, objective, tokenizer, dtype, export, eval_at_start=True,
                         sequences=2)

    run_stage(inputs, prepare, "pairs")
