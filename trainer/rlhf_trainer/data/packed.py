"""Sequences packed into rows: those that share a prompt hold it once, and short ones share a row.

DPO scores a chosen and a rejected response to the same prompt; GRPO and online RRHF score G or
k samples of one prompt. Run as separate rows, the model goes over that prompt again for every
sequence. Here a group of sequences becomes one unit: `prefix + tail_1 + tail_2 + ...`, where
`prefix` is the group's longest common prefix. Units then share rows where that saves padding
(sequence packing, as TRL's and OpenRLHF's padding-free training does): PPO's one sample per
prompt leaves a quarter of a padded batch empty. An attention mask lets each tail see its unit's
prefix and itself (causally) and nothing else, and position ids start again in every unit and
continue from the prefix in every tail, so every logit equals the one that sequence gives alone
(to float rounding; a test holds them to it). Prefix sharing for DPO: Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"; for sampled groups, the same
idea as vLLM's prefix cache, at training time.

Without a varlen attention kernel the mask is dense, so attention costs the square of a row's
length, masked pairs included: large groups are split over several units, and units share rows,
only as far as a FLOP estimate from the model config says pays (`row_cost`, padding to the
longest row counted). The mask is a 4D (rows, 1, L, L) tensor that transformers passes to the
attention as it is; only the `sdpa` (boolean mask) and `eager` (additive float mask)
implementations take one, so `supports_packing` gates its use. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    return config_row_cost(getattr(model, "config", None))


def config_row_cost(config: Any) -> tuple[float, float] | None:
    """`row_cost` from a model config."""
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


Unit = tuple[int, list[int]]  # (shared prefix length, member sequence indices)


def _first_fit(units: list[Unit], lengths: list[int], capacity: int) -> list[list[int]]:
    """Unit indices per row: longest first, each into the first row with room (first-fit
    decreasing), rows in the order they opened."""
    rows: list[list[int]] = []
    room: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: -lengths[u]):
        row = next((r for r, free in enumerate(room) if free >= lengths[u]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(u)
        room[row] -= lengths[u]
    return rows


def unit_length(unit: Unit, sequences: Sequence[Sequence[int]]) -> int:
    """Tokens of a unit in its row: the shared prefix once, then every member's tail."""
    prefix, members = unit
    return prefix + sum(len(sequences[i]) - prefix for i in members)


def layout_cost(
    rows: list[list[Unit]], sequences: Sequence[Sequence[int]], cost: tuple[float, float],
    width: int | None = None,
) -> float:
    """Estimated FLOPs of a layout by `cost` (`row_cost`), every row padded to the longest one
    (or to `width`)."""
    longest = max(sum(unit_length(unit, sequences) for unit in row) for row in rows)
    return len(rows) * width_cost(cost, longest if width is None else width)


def width_cost(cost: tuple[float, float], width: int) -> float:
    """Estimated FLOPs per layer of one row `width` tokens wide, by `cost` (`row_cost`)."""
    per_token, per_pair = cost
    return per_token * width + per_pair * width * width


def best_layout(
    sequences: Sequence[Sequence[int]], groups: Sequence[Sequence[int]], model: nn.Module | None
) -> list[list[Unit]] | None:
    """The rows, each a list of units. Every group is split into units of at most k tails and
    the units are first-fit into rows of at most m times the longest unit, with the one (k, m)
    for the whole batch that costs the fewest estimated FLOPs (`layout_cost`). None without a
    cost model."""
    cost = row_cost(model)
    if cost is None:
        return None
    prefixes = [common_prefix([sequences[i] for i in g]) for g in groups]

    def rows_for(k: int, m: int) -> list[list[Unit]]:
        units = [(p, run) for p, g in zip(prefixes, groups, strict=True) for run in _split(g, k)]
        lengths = [unit_length(unit, sequences) for unit in units]
        rows = _first_fit(units, lengths, m * max(lengths))
        return [[units[u] for u in row] for row in rows]

    largest = max(len(g) for g in groups)
    layouts = [rows_for(k, m) for k in range(1, largest + 1) for m in range(1, MAX_UNITS_ROW + 1)]
    return min(layouts, key=lambda rows: layout_cost(rows, sequences, cost))


# Rows up to this many times the longest unit: beyond it attention's square outgrows the saving.
MAX_UNITS_ROW = 4


def pack(
    sequences: Sequence[Sequence[int]],
    groups: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    model: nn.Module | None = None,
    mask_dtype: torch.dtype | None = None,
    layout: list[list[Unit]] | None = None,
) -> PackedRows:
    """Pack `sequences`, grouped by `groups` (lists of indices whose sequences share a prefix;
    every index in exactly one group), as the module docstring says: in `layout`, else in
    `best_layout` for `model`, else one row per group. `mask_dtype` None gives a boolean mask
    (sdpa); a float dtype an additive one (0 or the dtype's minimum; eager attention)."""
    rows = layout or best_layout(sequences, groups, model)
    if rows is None:
        rows = [[(common_prefix([sequences[i] for i in g]), list(g))] for g in groups]
    built = [_row(sequences, units) for units in rows]
    width = max(len(columns[0]) for columns in built)
    tensors = [torch.zeros((len(rows), width), dtype=torch.long) for _ in range(5)]
    input_ids, position_ids, unit_lo, shared_hi, seg_lo = tensors
    input_ids.fill_(pad_id)
    for r, columns in enumerate(built):
        for tensor, column in zip(tensors, columns, strict=True):
            tensor[r, : len(column)] = torch.tensor(column)
    lengths = torch.tensor([len(columns[0]) for columns in built])
    mask = _mask(unit_lo, shared_hi, seg_lo, lengths)
    attention: torch.Tensor = mask
    if mask_dtype is not None:
        attention = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill(
            ~mask, torch.finfo(mask_dtype).min
        )
    source = _source(sequences, rows, width)
    return PackedRows(
        input_ids.to(device), position_ids.to(device), attention.to(device), source.to(device)
    )


def _row(sequences: Sequence[Sequence[int]], units: list[Unit]) -> list[list[int]]:
    """One row's columns: token ids, position ids, and for the mask where each token's unit
    starts, where its shared prefix ends and where its own segment (prefix or tail) starts."""
    ids: list[int] = []
    positions: list[int] = []
    unit_lo: list[int] = []
    shared_hi: list[int] = []
    seg_lo: list[int] = []
    for prefix, members in units:
        lo = len(ids)
        ids += sequences[members[0]][:prefix]
        positions += range(prefix)
        seg_lo += [lo] * prefix
        for i in members:
            tail = sequences[i][prefix:]
            seg_lo += [len(ids)] * len(tail)
            ids += tail
            positions += range(prefix, prefix + len(tail))
        unit_lo += [lo] * (len(ids) - lo)
        shared_hi += [lo + prefix] * (len(ids) - lo)
    return [ids, positions, unit_lo, shared_hi, seg_lo]


def _mask(
    unit_lo: torch.Tensor, shared_hi: torch.Tensor, seg_lo: torch.Tensor, length: torch.Tensor
) -> torch.Tensor:
    """(G, 1, L, L) bool: query i sees key j <= i in its unit's shared prefix
    (unit_lo[i] <= j < shared_hi[i]) or in its own segment (j >= seg_lo[i]). A padding query
    (i >= length) sees only itself, so that no row is empty."""
    width = seg_lo.size(1)
    idx = torch.arange(width)
    q, k = idx.view(1, width, 1), idx.view(1, 1, width)
    allowed = (k >= unit_lo.unsqueeze(2)) & (k < shared_hi.unsqueeze(2))
    allowed |= k >= seg_lo.unsqueeze(2)
    allowed &= (k <= q) & (q < length.view(-1, 1, 1))
    allowed |= q == k
    return allowed.unsqueeze(1)


def _source(
    sequences: Sequence[Sequence[int]], rows: list[list[Unit]], width: int
) -> torch.Tensor:
    """(N, T): where each position of each sequence sits in the flattened rows."""
    longest = max(len(s) for s in sequences)
    source = [[0] * longest for _ in sequences]
    for r, units in enumerate(rows):
        base = r * width
        for prefix, members in units:
            start = prefix
            for i in members:
                n = len(sequences[i])
                tail = range(base + start, base + start + n - prefix)
                source[i][:n] = [*range(base, base + prefix), *tail]
                start += n - prefix
            base += start
    return torch.tensor(source, dtype=torch.long)


def packed_logits(
    model: nn.Module, packed: PackedRows, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The model over the packed rows, its output flattened over rows and positions: a causal
    LM's logits (G * L, V), or a value model's values (G * L,).

    With `keep` (flat indices into G * L, any shape), a causal LM's output layer runs only on
    those positions, and the logits come back as keep.shape + (V,). A row's prompt and padding
    then cost no output-layer matmul (TRL's and verl's `logits_to_keep`, per position): on
    SmolLM2 that layer is a fifth of the model's weights."""
    if keep is None:
        out: Any = _forward(model, packed)
        values: torch.Tensor = getattr(out, "logits", out)
        return values.reshape(-1, *values.shape[2:])
    return kept_logits(model, keep, lambda: _forward(model, packed))


def kept_logits(model: nn.Module, keep: torch.Tensor, forward: Callable[[], Any]) -> torch.Tensor:
    """`forward()` (the model's forward pass, output (B, L, ...)) with the output layer run only
    at `keep`, flat indices into B * L of any shape: keep.shape + (V,). A model without output
    embeddings (a value model) runs whole, and its output is indexed."""
    find_head = getattr(model, "get_output_embeddings", None)
    head = find_head() if callable(find_head) else None
    if not isinstance(head, nn.Module):
        out: Any = forward()
        values: torch.Tensor = getattr(out, "logits", out)
        return values.reshape(-1, *values.shape[2:])[keep]
    index = keep.reshape(-1)

    def only_kept(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden.reshape(-1, hidden.size(-1)).index_select(0, index), *args[1:])

    handle = head.register_forward_pre_hook(only_kept)
    try:
        logits: torch.Tensor = forward().logits
    finally:
        handle.remove()
    return logits.reshape(*keep.shape, logits.size(-1))


def _forward(model: nn.Module, packed: PackedRows) -> Any:
    return model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
    )


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
