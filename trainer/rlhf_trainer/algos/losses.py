"""Losses as pure functions of tensors. This module imports only torch."""

from __future__ import annotations

from typing import Any, NamedTuple

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


def sft_scored(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions `sft_loss_sum` scores in labels (B, T), as flat indices into B * T, and
    the tokens they predict (labels[b, t + 1]), both (N,) in row-major order."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return scored.reshape(-1).nonzero().squeeze(1), labels[:, 1:][scored[:, :-1]]


def sft_loss_sum_at(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`sft_loss_sum` from the logits (N, V) of the scored positions alone (`sft_scored`), so
    that prompt and padding positions need no output layer. Returns a float32 scalar."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def count_targets(labels: torch.Tensor) -> int:
    """Number of positions `sft_loss_sum` scores: labels (B, T), first position never a target."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each sequence's response tokens, and their count.

    logp[b] = sum_{t : y[b, t + 1] != -100} log softmax(logits[b, t])[y[b, t + 1]],  y = labels
    n[b]    = #{t : y[b, t + 1] != -100}

    logits: (B, T, V), any float dtype (computed in float32). labels: (B, T) int64, IGNORE_INDEX
    on prompt and padding. Returns (logp (B,) float32, n (B,) float32). The sequence score of
    DPO (Rafailov et al. 2023, "Direct Preference Optimization") and RRHF (Yuan et al. 2023).
    Gathers before normalising (logit - logsumexp), so no (B, T, V) log-softmax is kept.
    """
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = shifted.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_token = (picked - torch.logsumexp(shifted, dim=-1)) * mask
    return per_token.sum(-1), mask.sum(-1).float()


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise reward-model loss, per pair: L = -log sigmoid(r_c - r_r - m).

    chosen, rejected: (B,) scalar rewards of the preferred and the other response; margin: (B,)
    or None (0), a preference strength from the data. Returns (B,) float32.

    Bradley and Terry (1952); InstructGPT (Ouyang et al. 2022) for reward models; the margin as in
    Llama 2 (Touvron et al. 2023). MOSS-RLHF's optional LM term is added by the trainer.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where chosen > rejected, 0.5 on a tie, 0 otherwise. (B,), (B,) -> (B,).

    Ties count half so that a model that cannot tell the two apart (e.g. a DPO policy equal to its
    reference, whose implicit rewards are all 0) scores 50%, the chance level, rather than 0%.
    """
    c, r = chosen.float(), rejected.float()
    return (c > r).float() + 0.5 * (c == r).float()


class DPOLoss(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss
    chosen_rewards: torch.Tensor  # (B,) beta * (logp_c - ref_logp_c), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (logp_r - ref_logp_r), detached


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLoss:
    """DPO and its IPO and hinge variants, per pair.

    With log-ratios h_c = logp(y_c) - logp_ref(y_c), h_r likewise, and z = beta * (h_c - h_r):
      sigmoid: L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)   (DPO, Rafailov et al. 2023;
               eps = label_smoothing > 0 is conservative DPO, Mitchell 2023)
      hinge:   L = max(0, 1 - z)                                     (SLiC, Zhao et al. 2023)
      ipo:     L = (h_c / |y_c| - h_r / |y_r| - 1 / (2 beta))^2      (IPO, Azar et al. 2023, eq. 17;
               per-token mean log-ratios as TRL's DPOTrainer does, so it needs the lengths)

    All inputs (B,): sequence log-probs summed over completion tokens (`sequence_logprobs`) and
    completion token counts. Returns per-pair losses and the implicit rewards beta * h, float32.
    """
    h_c = chosen_logps.float() - ref_chosen_logps.float()
    h_r = rejected_logps.float() - ref_rejected_logps.float()
    z = beta * (h_c - h_r)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths")
        mean_c = h_c / chosen_lengths.float().clamp(min=1)
        mean_r = h_r / rejected_lengths.float().clamp(min=1)
        losses = (mean_c - mean_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; use sigmoid, hinge or ipo")
    return DPOLoss(losses, (beta * h_c).detach(), (beta * h_r).detach())


class RRHFLoss(NamedTuple):
    rank: torch.Tensor  # (N,) ranking loss per query
    sft: torch.Tensor  # (N,) mean NLL per token of the best-rewarded response


def rrhf_loss(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    rewards: torch.Tensor,
    *,
    length_penalty: float = 1.0,
    valid: torch.Tensor | None = None,
) -> RRHFLoss:
    """RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human
    Feedback"; GanjinZero/RRHF train.py), per query with k responses:

      p_i    = logp_i / |y_i|^lengthPenalty
      L_rank = sum_{i, j : r_i < r_j} max(0, p_i - p_j)
      L_sft  = -logp_b / |y_b|,  b = argmax_i r_i   (the first best on a tie)

    The trainer's total is rrhfWeight * L_rank + L_sft.

    logps: (N, K) summed response log-probs; lengths: (N, K) response token counts; rewards:
    (N, K); valid: (N, K) bool, False on padding slots of queries with fewer than K responses.
    Returns (rank (N,), sft (N,)), float32.
    """
    logps, rewards = logps.float(), rewards.float()
    lengths = lengths.float().clamp(min=1)
    if valid is None:
        valid = torch.ones_like(logps, dtype=torch.bool)
    scores = logps / lengths**length_penalty
    worse = rewards.unsqueeze(2) < rewards.unsqueeze(1)  # [n, i, j]: r_i < r_j
    pair = worse & valid.unsqueeze(2) & valid.unsqueeze(1)
    diff = scores.unsqueeze(2) - scores.unsqueeze(1)  # [n, i, j]: p_i - p_j
    rank = (torch.relu(diff) * pair).sum(dim=(1, 2))
    best = rewards.masked_fill(~valid, float("-inf")).argmax(dim=1, keepdim=True)
    sft = -(logps.gather(1, best) / lengths.gather(1, best)).squeeze(1)
    return RRHFLoss(rank, sft)


# -- online RL: per-token log-probs and entropy (the objectives are in algos/policy_losses.py) --


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], position by position (the caller aligns them: logits at t
    predict tokens at t).

    logits: (B, R, V), any float dtype (computed in float32); tokens: (B, R) int64 (pad positions
    may hold any id; mask them afterwards). Returns (B, R) float32. Gathers before normalising,
    so no (B, R, V) log-softmax is materialised (TRL's `selective_log_softmax`), and normalises
    in blocks of positions (`token_logprobs_and_entropy`).
    """
    return token_logprobs_and_entropy(logits, tokens)[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position: H = logsumexp(z) - sum softmax(z) z.

    logits: (B, R, V) -> (B, R) float32.
    """
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


# Positions per block of `token_logprobs_and_entropy`: a block's float32 logits (8 x 49152 on
# SmolLM2, 1.5 MiB) stay in the CPU's cache through the max, exp and sums that would otherwise
# each stream the whole (B, R, V) tensor from memory. At 16 x 32 positions of SmolLM2 (2 CPUs):
# log-probs, entropy and backward 0.18 s against 0.52 s for `token_logprobs` and
# `entropy_from_logits`; blocks of 4 to 128 positions all came within 0.16-0.21 s.
LOGPROB_BLOCK = 8


class _BlockedTokenLogprobs(torch.autograd.Function):
    """log softmax(z)[token] and, without gradient, the entropy, a block of positions at a time;
    the backward recomputes softmax(z) per block from the saved logsumexp."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        flat, ids = logits.reshape(-1, logits.size(-1)), tokens.reshape(-1, 1)
        lse = torch.empty(flat.size(0), dtype=torch.float32, device=logits.device)
        entropy = torch.zeros_like(lse)
        for lo in range(0, flat.size(0), LOGPROB_BLOCK):
            z = flat[lo : lo + LOGPROB_BLOCK].float()
            top = z.amax(dim=-1, keepdim=True)
            e = (z - top).exp_()
            total = e.sum(dim=-1)
            lse[lo : lo + LOGPROB_BLOCK] = top.squeeze(-1) + total.log()
            if with_entropy:  # H = lse - sum softmax(z) z
                expected = e.mul_(z).sum(dim=-1) / total
                entropy[lo : lo + LOGPROB_BLOCK] = lse[lo : lo + LOGPROB_BLOCK] - expected
        picked = flat.gather(1, ids).squeeze(1).float()
        # The (N, V) logits, not the caller's tensor: where that is a slice of a larger output
        # (an unpacked batch's response columns), `flat` is its compact copy, and saving it lets
        # the larger output go and spares the backward a second copy.
        ctx.save_for_backward(flat, ids, lse)
        ctx.shape = logits.shape
        entropy = entropy.view(tokens.shape)
        ctx.mark_non_differentiable(entropy)
        return (picked - lse).view(tokens.shape), entropy

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, _entropy_grad: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None]:
        flat, ids, lse = ctx.saved_tensors
        g = grad.reshape(-1, 1).float()
        out = torch.empty_like(flat)
        for lo in range(0, flat.size(0), LOGPROB_BLOCK):
            block = slice(lo, lo + LOGPROB_BLOCK)
            p = (flat[block].float() - lse[block].unsqueeze(1)).exp_()
            out[block] = p.mul_(-g[block])  # d/dz of -lse: -softmax(z)
        out.scatter_add_(1, ids, g.to(out.dtype))  # d/dz of z[token]
        return out.view(ctx.shape), None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` (differentiable) and, with `with_entropy`, `entropy_from_logits`
    (detached: a diagnostic) from one pass over the logits in blocks of `LOGPROB_BLOCK`
    positions. Same shapes and dtypes as those two."""
    logprobs, entropy = _BlockedTokenLogprobs.apply(logits, tokens, with_entropy)  # type: ignore[no-untyped-call]
    return logprobs, entropy if with_entropy else None
