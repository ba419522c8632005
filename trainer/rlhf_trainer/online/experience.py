"""From rollouts to optimisation: the `Experience` of one step, and the forward passes that
fill it (policy and reference logprobs, critic values, reward-model scores).

Layout: prompts left-padded to P, responses right-padded to R, so every response starts at
column P and response tensors are (B, R) with column t the t-th response token. Position ids
come from the attention mask, so padding never shifts a token's position (the logprobs match
the rollout server's, which sees no padding).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from rlhf_trainer.algos.losses import (
    entropy_from_logits,
    token_logprobs,
    token_logprobs_and_entropy,
)
from rlhf_trainer.data.packed import (
    PackedRows,
    best_layout,
    layout_cost,
    mask_dtype,
    pack,
    packed_logits,
    row_cost,
    shared_prompt_groups,
    supports_packing,
)
from rlhf_trainer.rollout.client import Sample


@dataclass(frozen=True)
class Batch:
    """A rank's samples as tensors (what the server returned, nothing computed yet)."""

    sequences: torch.Tensor  # (B, P + R) int64: left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + R) int64: 1 on real tokens
    response_mask: torch.Tensor  # (B, R) float32: 1 on the response tokens that carry the loss
    behaviour_logprobs: torch.Tensor  # (B, R) float32: the server's logprobs of the tokens

    @property
    def prompt_len(self) -> int:
        return int(self.sequences.size(1) - self.response_mask.size(1))

    @property
    def responses(self) -> torch.Tensor:  # (B, R) int64
        return self.sequences[:, self.prompt_len :]


@dataclass(frozen=True)
class Experience:
    """One rank's share of a step's rollouts, ready for optimisation (OpenRLHF's
    `Experience`). B samples; R the longest response."""

    batch: Batch
    # (B, R): log π_old, the policy the ratio is taken against. None when the experience gets
    # exactly one optimizer step: the policy has not moved since the rollout, so π_old is the
    # current policy and the loss takes its logprobs, detached (no second forward pass).
    old_logprobs: torch.Tensor | None
    advantages: torch.Tensor  # (B, R) PPO (GAE, whitened); (B,) GRPO (group-relative)
    scores: torch.Tensor  # (B,) float32: raw rewards of the samples
    ref_logprobs: torch.Tensor | None = None  # (B, R): log π_ref (None when no KL is used)
    values: torch.Tensor | None = None  # (B, R): critic values at sampling time (PPO)
    returns: torch.Tensor | None = None  # (B, R): GAE returns A + V (PPO)
    rewards: torch.Tensor | None = None  # (B, R): per-token rewards, KL penalty included (PPO)
    row: torch.Tensor | None = None  # (B,) int64: each sample's place in the step's experience
    # (B, R): truncated IS weights min(π_old / π_rollout, C) of each token's policy loss
    # (`rolloutCorrection`), detached; None without the correction.
    is_weights: torch.Tensor | None = None

    def select(self, index: Sequence[int]) -> Experience:
        """The rows `index` of every tensor."""
        rows = torch.tensor(list(index), dtype=torch.long)

        def pick(t: Any) -> Any:
            return None if t is None else t.index_select(0, rows.to(t.device))

        batch = Batch(**{f.name: pick(getattr(self.batch, f.name)) for f in fields(Batch)})
        tensors = {f.name: pick(getattr(self, f.name)) for f in fields(self) if f.name != "batch"}
        return replace(self, batch=batch, **tensors)


def collate_samples(samples: Sequence[Sample], pad_id: int, device: torch.device) -> Batch:
    """Samples -> a Batch (prompts left-padded, responses right-padded)."""
    width_p = max(len(s.prompt_ids) for s in samples)
    width_r = max(max(len(s.response_ids) for s in samples), 1)
    n = len(samples)
    sequences = torch.full((n, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_r), dtype=torch.long)
    response_mask = torch.zeros((n, width_r), dtype=torch.float32)
    behaviour = torch.zeros((n, width_r), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        sequences[i, width_p - p : width_p] = torch.tensor(s.prompt_ids)
        attention[i, width_p - p : width_p + r] = 1
        if r:
            sequences[i, width_p : width_p + r] = torch.tensor(s.response_ids)
            trained = s.trained_mask if s.trained_mask is not None else (1,) * r
            response_mask[i, :r] = torch.tensor(trained, dtype=torch.float32)
            behaviour[i, :r] = torch.tensor(s.logprobs)
    return Batch(
        sequences.to(device),
        attention.to(device),
        response_mask.to(device),
        torch.nan_to_num(behaviour).to(device),
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever padding precedes them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def response_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, R, V): the logits that predict each response token (positions P-1 .. P+R-2). The
    samples run packed (`data/packed.py`: a prompt once for all its samples, short sequences sharing
    a row) where the model's attention takes the mask and packing pays."""
    packed = _packed(model, batch)
    if packed is not None:
        rows, where = packed
        return packed_logits(model, rows, keep=where)
    out = model(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
    )
    p, r = batch.prompt_len, batch.response_mask.size(1)
    logits: torch.Tensor = out.logits[:, p - 1 : p - 1 + r]
    return logits


# Packing must save at least this share of the estimated FLOPs to be worth building the rows.
PACKING_SAVES = 0.1


def _packed(model: nn.Module, batch: Batch) -> tuple[PackedRows, torch.Tensor] | None:
    """The batch packed, and (B, R) where the output at each response token's predicting
    position sits in the flattened rows (0 past a response's end); None where packing does
    not apply (`supports_packing`) or saves less than `PACKING_SAVES`."""
    if not supports_packing(model):
        return None
    p = batch.prompt_len
    real = batch.attention_mask.bool().cpu()
    ids = batch.sequences.cpu()
    # Response lengths from the attention mask: an episode's environment tokens are attended
    # but masked out of the loss (`Sample.trained_mask`).
    lengths = batch.attention_mask[:, p:].sum(dim=1).long().cpu().tolist()
    prompts = [ids[i, :p][real[i, :p]].tolist() for i in range(ids.size(0))]
    sequences = [
        prompt + ids[i, p : p + n].tolist()
        for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    groups = shared_prompt_groups(prompts)
    cost, layout = row_cost(model), best_layout(sequences, groups, model)
    if cost is None or layout is None:
        return None
    alone = [[(0, [i])] for i in range(len(sequences))]
    padded_cost = layout_cost(alone, sequences, cost, width=batch.sequences.size(1))
    if layout_cost(layout, sequences, cost) > (1 - PACKING_SAVES) * padded_cost:
        return None
    # Pad with token 0: padding is never attended.
    rows = pack(sequences, groups, 0, batch.sequences.device, model, mask_dtype(model), layout)
    column = torch.zeros(batch.response_mask.shape, dtype=torch.long)
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        column[i, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
    return rows, rows.source.gather(1, column.to(rows.source.device))


def policy_logprobs(
    model: nn.Module,
    batch: Batch,
    with_entropy: bool = False,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(response tokens) (B, R) float32, and their entropies when asked; 0 on padding.

    With `temperature` T ≠ 1 the logits are divided by T first: log softmax(z / T), the
    distribution the tokens were sampled from (`logprobTemperature: sampling`), and the
    entropy is that of the tempered distribution. The entropy carries gradients only with
    `entropy_grad` (an entropy bonus in the loss): as a diagnostic, its softmax over the
    vocabulary at every response token would otherwise be kept for a backward never taken."""
    logits = response_logits(model, batch)
    if temperature != 1.0:
        logits = logits.float() / temperature
    mask = batch.response_mask
    if with_entropy and entropy_grad and torch.is_grad_enabled():
        return token_logprobs(logits, batch.responses) * mask, entropy_from_logits(logits) * mask
    logprobs, entropy = token_logprobs_and_entropy(logits, batch.responses, with_entropy)
    return logprobs * mask, None if entropy is None else entropy * mask


def tempered_and_raw_logprobs(model: nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """(B, R, 2): log π at `temperature` and at 1 (what the rollout engines report) from one
    forward pass; 0 on padding. For a truncated IS weight against the engines' logprobs when
    the ratio is taken at the sampling temperature."""
    logits = response_logits(model, batch).float()
    raw = token_logprobs(logits, batch.responses)
    tempered = token_logprobs(logits / temperature, batch.responses)
    mask = batch.response_mask.unsqueeze(-1)
    return torch.stack([tempered, raw], dim=-1) * mask


def critic_values(critic: nn.Module, batch: Batch) -> torch.Tensor:
    """V(s_t) for each response token (B, R) float32: the critic's value at the position
    before the token (the state it is sampled in), as for the logits; packed as they are."""
    packed = _packed(critic, batch)
    if packed is not None:
        rows, where = packed
        return packed_logits(critic, rows, keep=where).float() * batch.response_mask
    values = critic(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
    )
    p, r = batch.prompt_len, batch.response_mask.size(1)
    out: torch.Tensor = values[:, p - 1 : p - 1 + r].float() * batch.response_mask
    return out


def scored_sequences(
    samples: Sequence[Sample],
    eos_id: int | None,
    pad_id: int,
    device: torch.device,
    stops: Collection[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + response (+ EOS when the response ends with neither EOS nor another of `stops`,
    such as a chat template's end-of-turn token: reward models learn to read the last token,
    as `batching.tokenize_sft` trains them), right-padded; (ids, mask)."""
    ends = {eos_id, *stops}
    rows = []
    for s in samples:
        ids = list(s.prompt_ids) + list(s.response_ids)
        if eos_id is not None and (not s.response_ids or s.response_ids[-1] not in ends):
            ids.append(eos_id)
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids_t[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids_t.to(device), mask.to(device)


@torch.no_grad()
def in_chunks(
    n: int, size: int, compute: Callable[[slice], torch.Tensor]
) -> torch.Tensor:
    """`compute` over rows [0, n) in chunks of `size` (bounded memory), concatenated."""
    parts = [compute(slice(i, min(i + size, n))) for i in range(0, n, size)]
    return torch.cat(parts, dim=0)


def slice_batch(batch: Batch, rows: slice) -> Batch:
    """Some rows of a Batch. The columns stay as they are, so what is computed on a slice lines
    up with the step's other (B, R) tensors."""
    return Batch(
        batch.sequences[rows],
        batch.attention_mask[rows],
        batch.response_mask[rows],
        batch.behaviour_logprobs[rows],
    )
