"""Tokenized examples, the deterministic data order, and how a global batch splits over ranks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_trainer.data import PreferenceRow, SFTRow
from rlhf_trainer.losses import IGNORE_INDEX
from rlhf_trainer.preflight import micro_batch_size


@dataclass(frozen=True)
class Example:
    """One tokenized sequence. labels: IGNORE_INDEX on prompt tokens, token ids on the response."""

    input_ids: list[int]
    labels: list[int]


def tokenize_sft(rows: Sequence[SFTRow], tokenizer: Any, max_length: int) -> list[Example]:
    """prompt (with the tokenizer's own special tokens, e.g. BOS) + response + EOS.

    Too long: the response keeps up to max_length tokens and the prompt loses tokens from its
    start, so truncation never hides what the model should learn to say.
    """
    prompts = tokenizer([r.prompt for r in rows])["input_ids"]
    responses = tokenizer([r.response for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for p, r in zip(prompts, responses, strict=True):
        r = (list(r) + eos)[:max_length]
        p = list(p)[len(p) - (max_length - len(r)) :] if len(p) + len(r) > max_length else list(p)
        out.append(Example(p + r, [IGNORE_INDEX] * len(p) + r))
    return out


@dataclass(frozen=True)
class PairExample:
    """A tokenized preference pair: the same prompt with the preferred and the other response."""

    chosen: Example
    rejected: Example
    margin: float | None = None


def tokenize_pairs(
    rows: Sequence[PreferenceRow], tokenizer: Any, max_length: int
) -> list[PairExample]:
    """Each side tokenized as an SFT example (prompt + response + EOS, response labels only)."""
    chosen = tokenize_sft([SFTRow(r.prompt, r.chosen) for r in rows], tokenizer, max_length)
    rejected = tokenize_sft([SFTRow(r.prompt, r.rejected) for r in rows], tokenizer, max_length)
    return [
        PairExample(c, r, row.margin) for c, r, row in zip(chosen, rejected, rows, strict=True)
    ]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, each (B, T_max)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rank_micro_batches(
    indices: Sequence[int], world_size: int, rank: int, grad_accum: int
) -> list[list[int]]:
    """This rank's micro-batches of one global batch: micro-step m takes the m-th chunk of
    world_size * micro examples, and rank r the r-th slice of that chunk."""
    micro = micro_batch_size(len(indices), world_size, grad_accum)
    chunk = world_size * micro
    return [
        list(indices[m * chunk + rank * micro : m * chunk + (rank + 1) * micro])
        for m in range(grad_accum)
    ]


class DataStream:
    """Endless example order: epoch e is a permutation of range(n) seeded by seed + e (range(n)
    itself with shuffle=False), and a batch that runs past the end of an epoch continues into
    the next. (epoch, index) is the position."""

    def __init__(
        self, n: int, seed: int, epoch: int = 0, index: int = 0, shuffle: bool = True
    ) -> None:
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.shuffle = shuffle
        self._order = self._permutation(epoch)

    def at(self, epoch: int, index: int) -> DataStream:
        """The same order, from another position."""
        return DataStream(self.n, self.seed, epoch, index, self.shuffle)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(out), self.n - self.index)
            out.extend(self._order[self.index : self.index + take])
            self.index += take
        return out

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far, e.g. 2.5."""
        return self.epoch + self.index / self.n
