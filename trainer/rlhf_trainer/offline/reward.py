"""The `reward` stage: a pairwise (Bradley–Terry) reward model, trained with FSDP2.

Per pair, L = -log sigmoid(r_c - r_r - m) (`losses.bradley_terry_loss`), with the margin m from
the data when `rewardModel.useMargin`, plus `lmLossWeight` times the token-mean LM loss on the
chosen response (MOSS-RLHF). Means are over the global batch (pairs, and chosen tokens for the LM
term). Logged: loss, accuracy (chosen scored above rejected, ties half) and the mean chosen and
rejected rewards; held out: eval_loss and eval_accuracy, before training and at each checkpoint.
The output is a `...ForSequenceClassification` with one label (see `reward_model.py`), saved
with a pad token that is not EOS (`reward_model.reward_pad_id`) so that Hugging Face's pooling
reads the EOS training scored. Dropout is off (`determinism.disable_dropout`, TRL's default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhf_trainer.algos.losses import bradley_terry_loss, pairwise_accuracy, sft_loss_sum
from rlhf_trainer.config import RewardModelOptions
from rlhf_trainer.data.batching import (
    Example,
    PairExample,
    collate,
    n_targets,
    tokenize_pairs,
)
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import PreferenceRow
from rlhf_trainer.models import lora
from rlhf_trainer.models.causal_lm import load_tokenizer
from rlhf_trainer.models.reward_model import (
    ScalarHeadModel,
    last_token_values,
    load_reward_backbone,
    reward_exporter,
    reward_pad_id,
)
from rlhf_trainer.runtime.determinism import disable_dropout
from rlhf_trainer.runtime.distributed import DistContext, shard_model
from rlhf_trainer.training.loop import (
    StepResult,
    Trainable,
    backward_micro_batches,
    evaluate_rounds,
    run_stage,
)


def pair_tensors(
    pairs: list[PairExample], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences in one right-padded batch of 2B rows."""
    examples: list[Example] = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


class RewardObjective:
    def __init__(
        self,
        model: nn.Module,
        pairs: list[PairExample],
        eval_pairs: list[PairExample],
        inputs: StageInputs[PreferenceRow],
        ctx: DistContext,
        pad_id: int,
    ) -> None:
        self.model, self.pairs, self.eval_pairs = model, pairs, eval_pairs
        self.inputs, self.ctx, self.pad_id = inputs, ctx, pad_id
        self.options = inputs.config.reward_model or RewardModelOptions()

    def _sums(
        self, pairs: list[PairExample], weights: list[float], n_pairs: float, n_tokens: float | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of these pairs as their share of the global mean (over `n_pairs` pairs and, for
        the LM term, `n_tokens` chosen tokens; None leaves it out), and metric sums."""
        t = pair_tensors(pairs, self.pad_id, self.ctx.device)
        values, logits = self.model(t["input_ids"], t["attention_mask"])
        chosen, rejected = last_token_values(values, t["attention_mask"]).chunk(2)
        w = torch.tensor(weights, device=chosen.device)
        use_margin = self.options.use_margin
        margins = [(p.margin or 0.0) if use_margin else 0.0 for p in pairs]
        margin = torch.tensor(margins, device=chosen.device)
        loss = (bradley_terry_loss(chosen, rejected, margin) * w).sum() / n_pairs
        if logits is not None and n_tokens is not None and self.options.lm_loss_weight > 0:
            n = len(pairs)
            lm = sft_loss_sum(logits[:n], t["labels"][:n])
            loss = loss + self.options.lm_loss_weight * lm / max(n_tokens, 1.0)
        sums = {
            "correct": float((pairwise_accuracy(chosen, rejected) * w).sum()),
            "chosen_reward": float((chosen.detach() * w).sum()),
            "rejected_reward": float((rejected.detach() * w).sum()),
            "tokens": float(t["attention_mask"].sum()),
        }
        return loss, sums

    def train_step(self, batch: list[int]) -> StepResult:
        n = float(len(batch))
        tokens = float(sum(n_targets(self.pairs[i].chosen) for i in batch))
        sums = backward_micro_batches(
            self.model,
            batch,
            self.ctx,
            self.inputs.config.hyperparameters.gradient_accumulation,
            lambda idx: self._sums([self.pairs[i] for i in idx], [1.0] * len(idx), n, tokens),
            1.0,
        )
        metrics = {k: sums[k] / n for k in ("chosen_reward", "rejected_reward")}
        return StepResult(
            sums["loss"], sums["tokens"], {"accuracy": sums["correct"] / n, **metrics}
        )

    def evaluate(self) -> dict[str, float]:
        if not self.eval_pairs:
            return {}

        def step(indices: list[int], real: list[bool]) -> dict[str, float]:
            pairs = [self.eval_pairs[i] for i in indices]
            loss, sums = self._sums(pairs, [float(r) for r in real], 1.0, None)
            return {"loss": float(loss), "correct": sums["correct"]}

        n = len(self.eval_pairs)
        sums = evaluate_rounds(self.model, n, self.ctx, self.inputs.micro_batch, step)
        return {"eval_loss": sums["loss"] / n, "eval_accuracy": sums["correct"] / n}


def run_reward(inputs: StageInputs[PreferenceRow]) -> None:
    """Train the reward model, then write `<output_dir>/final`. Collective."""
    config, hp = inputs.config, inputs.config.hyperparameters
    options = config.reward_model or RewardModelOptions()

    def prepare(ctx: DistContext) -> Trainable:
        tokenizer: Any = load_tokenizer(config.model, inputs.model_ref)
        pairs = tokenize_pairs(inputs.train_rows, tokenizer, hp.max_length)
        held_out = (
            tokenize_pairs(inputs.eval_rows, tokenizer, hp.max_length) if inputs.eval_rows else []
        )
        model, dtype = load_reward_backbone(
            config.model, inputs.model_ref, options.lm_loss_weight > 0
        )
        pad_id = reward_pad_id(tokenizer, int(model.config.vocab_size))
        export = reward_exporter(model.config, config.lora, pad_id)
        if config.lora is not None:
            model = ScalarHeadModel(
                lora.apply_lora(model.backbone, config.lora), model.score, model.lm_head
            )
        model.train()
        # TRL's RewardConfig default: repeatable passes, as in offline/dpo.py.
        disable_dropout(model)
        shard_model(model, ctx.bf16)
        objective = RewardObjective(model, pairs, held_out, inputs, ctx, pad_id)
        return Trainable(model, objective, tokenizer, dtype, export, eval_at_start=True,
                         sequences=2)

    run_stage(inputs, prepare, "pairs")
