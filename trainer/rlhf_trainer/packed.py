"""Sequences that share a prompt, run as one row that holds the prompt once.

DPO scores a chosen and a rejected response to the same prompt; GRPO and online RRHF score G or
k samples of one prompt. Run as separate rows, the model goes over that prompt again for every
sequence. Here a group of sequences becomes one row: `prefix + tail_1 + tail_2 + ...`, where
`prefix` is the group's longest common prefix. An attention mask lets each tail see the prefix
and itself (causally) but no other tail, and each tail's position ids continue from the end of
the prefix, so every logit equals the one that sequence gives alone (to float rounding; a test
holds them to it). With short answers to long prompts this cuts the tokens of a forward and
backward by up to the group size. Prefix sharing for DPO: Wang et al. 2024, "Accelerating Direct
Preference Optimization with Prefix Sharing"; for sampled groups, the same idea as vLLM's prefix
cache, at training time.

Attention grows with the square of a row's length, so large groups are split over several rows
when that costs less (`row_cost`, a FLOP estimate from the model config). The mask is a 4D
(rows, 1, L, L) tensor that transformers passes to the attention as it is; only the `sdpa`
(boolean mask) and `eager` (additive float mask) implementations take one, so
`supports_packing` gates its use. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class PackedRows:
    input_ids: torch.Tensor  # (G, L) groups' rows, right-padded
    position_ids: torch.Tensor  # (G, L) each token's position in its own sequence
    attention_mask: torch.Tensor  # (G, 1, L, L) bool (sdpa) or additive float (eager)
    # (N, T) flat index into (G * L) of the logit at each position of sequence i (T = the
    # longest sequence; 0 past a sequence's end)
    source: torch.Tensor


def supports_packing(model: nn.Module) -> bool:
    """Whether the model's attention takes a custom 4D mask (flash attention, for one, ignores
    it, so a packed row would leak one tail into another)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in MASK_IMPLEMENTATIONS


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix that the sequences share (at most the shortest minus one,
    so that every sequence keeps a tail of its own); 0 for a sequence alone."""
    if len(sequences) < 2:
        return 0
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def row_cost(model: nn.Module | None) -> tuple[float, float] | None:
    """Estimated FLOPs per layer of a row of L tokens as (per token, per token pair):
    `2 * params * L` for the linear layers and `4 * hidden * L^2` for attention scores and
    values (the mask skips no pair). None without a Llama-like config."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    inter = getattr(config, "intermediate_size", None)
    if not isinstance(hidden, int) or not isinstance(inter, int):
        return None
    return 2.0 * (4 * hidden * hidden + 3 * hidden * inter), 4.0 * hidden


def _split(group: Sequence[int], k: int) -> list[list[int]]:
    """A group's members in runs of k, as even as runs of at most k can be."""
    count = math.ceil(len(group) / k)
    size = math.ceil(len(group) / count)
    return [list(group[j : j + size]) for j in range(0, len(group), size)]


def _rows(
    sequences: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], model: nn.Module | None
) -> list[tuple[int, list[int]]]:
    """(shared prefix length, member sequence indices) of every row. Every group is split into
    rows of at most k tails, with the one k for the whole batch that costs the fewest estimated
    FLOPs (`row_cost`), padding to the longest row included; one row per group without a cost."""
    prefixes = [common_prefix([sequences[i] for i in g]) for g in groups]
    cost = row_cost(model)
    largest = max(len(g) for g in groups)
    if cost is None or largest == 1:
        return [(p, list(g)) for p, g in zip(prefixes, groups, strict=True)]
    per_token, per_pair = cost

    def layout(k: int) -> list[tuple[int, list[int]]]:
        return [(p, run) for p, g in zip(prefixes, groups, strict=True) for run in _split(g, k)]

    def estimate(rows: list[tuple[int, list[int]]]) -> float:
        width = max(p + sum(len(sequences[i]) - p for i in run) for p, run in rows)
        return len(rows) * (per_token * width + per_pair * width * width)

    return min((layout(k) for k in range(1, largest + 1)), key=estimate)


def pack(
    sequences: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    model: nn.Module | None = None,
    mask_dtype: torch.dtype | None = None,
) -> PackedRows:
    """Pack `sequences`, grouped by `groups` (lists of indices whose sequences share a prefix;
    every index in exactly one group), as the module docstring says. `model`: split large
    groups by its cost (None: one row per group). `mask_dtype` None gives a boolean mask
    (sdpa); a float dtype an additive one (0 or the dtype's minimum; eager attention)."""
    rows = _rows(sequences, groups, model)
    built = []
    for prefix, members in rows:
        ids = list(sequences[members[0]][:prefix])
        positions, starts = list(range(prefix)), [0] * prefix
        for i in members:
            tail = sequences[i][prefix:]
            starts += [len(ids)] * len(tail)  # where this tail begins in the row
            ids += tail
            positions += range(prefix, prefix + len(tail))
        built.append((ids, positions, starts))
    width = max(len(ids) for ids, _, _ in built)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    start = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, positions, starts) in enumerate(built):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        position_ids[r, : len(ids)] = torch.tensor(positions)
        start[r, : len(ids)] = torch.tensor(starts)
    prefixes = torch.tensor([prefix for prefix, _ in rows])
    lengths = torch.tensor([len(ids) for ids, _, _ in built])
    mask = _mask(start, prefixes, lengths)
    attention: torch.Tensor = mask
    if mask_dtype is not None:
        attention = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(
            ~mask, torch.finfo(mask_dtype).min
        )
    source = _source(sequences, rows, width)
    return PackedRows(
        input_ids.to(device), position_ids.to(device), attention.to(device), source.to(device)
    )


def _mask(start: torch.Tensor, prefix: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """(G, 1, L, L) bool: query i of a row sees key j <= i that is in the row's shared prefix
    (j < prefix) or in i's own segment (j >= start[i], where i's tail begins; 0 in the
    prefix). A padding query (i >= length) sees only itself, so that no row is empty."""
    width = start.size(1)
    idx = torch.arange(width)
    q, k = idx.view(1, width, 1), idx.view(1, 1, width)
    allowed = (k < prefix.view(-1, 1, 1)) | (k >= start.unsqueeze(2))
    allowed &= (k <= q) & (q < length.view(-1, 1, 1))
    allowed |= q == k
    return allowed.unsqueeze(1)


def _source(
    sequences: Sequence[Sequence[int]], rows: list[tuple[int, list[int]]], width: int
) -> torch.Tensor:
    """(N, T): where each position of each sequence sits in the flattened rows."""
    longest = max(len(s) for s in sequences)
    source = [[0] * longest for _ in sequences]
    for r, (prefix, members) in enumerate(rows):
        base, start = r * width, prefix
        for i in members:
            n = len(sequences[i])
            tail = range(base + start, base + start + n - prefix)
            source[i][:n] = [*range(base, base + prefix), *tail]
            start += n - prefix
    return torch.tensor(source, dtype=torch.long)


def packed_logits(model: nn.Module, packed: PackedRows) -> torch.Tensor:
    """The model over the packed rows: logits flattened to (G * L, V)."""
    out: Any = model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
    )
    logits: torch.Tensor = out.logits
    return logits.reshape(-1, logits.size(-1))


def mask_dtype(model: nn.Module) -> torch.dtype | None:
    """The mask `pack` should build for this model: boolean for sdpa, additive for eager."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "eager":
        return None
    param = next(model.parameters(), None)
    return param.dtype if param is not None else torch.float32


def shared_prompt_groups(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices grouped by identical prompt, in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(i)
    return list(groups.values())


def gathered_logprobs(
    flat: torch.Tensor, source: torch.Tensor, targets: torch.Tensor, ignore: int
) -> torch.Tensor:
    """Per position of each sequence, log softmax(logit)[target]: flat (G * L, V) packed logits,
    source and targets (N, T) (`targets` = the token each position predicts, `ignore` where not
    scored). Returns (N, T) float32, 0 where ignored. Only the scored positions' logsumexp and
    target logit are gathered; no (N, T, V) copy of the logits is made."""
    flat = flat.float()
    scored = targets != ignore
    lse = torch.logsumexp(flat, dim=-1)[source]
    picked = flat[source, targets.clamp(min=0)]
    return (picked - lse) * scored
