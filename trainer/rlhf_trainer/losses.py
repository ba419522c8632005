"""Losses as pure functions of tensors. This module imports only torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over response tokens (the SFT loss before normalisation).

    L_sum = sum_{b, t : y[b, t + 1] != -100} -log softmax(logits[b, t])[y[b, t + 1]],  y = labels

    logits: (B, T, V), any float dtype (computed in float32). labels: (B, T) int64 token ids, with
    IGNORE_INDEX (-100) on prompt and padding positions. Returns a float32 scalar.

    The supervised stage of InstructGPT (Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback"), with the prompt masked as in TRL's completion-only loss.

    Dividing by the number of response tokens in the whole global batch (`count_targets` summed
    over every micro-batch and rank) makes the mean independent of world size and gradient
    accumulation, as in OpenRLHF's loss aggregation and TRL's `average_tokens_across_devices`.
    """
    vocab = logits.size(-1)
    shifted = logits[:, :-1, :].reshape(-1, vocab).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """Number of positions `sft_loss_sum` scores: labels (B, T), first position never a target."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())
