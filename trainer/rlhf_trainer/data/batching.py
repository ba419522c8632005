"""Tokenized examples, the deterministic data order, and how a global batch splits over ranks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_trainer.algos.losses import IGNORE_INDEX
from rlhf_trainer.data.chat_data import end_of_turn
from rlhf_trainer.data.inputs import micro_batch_size
from rlhf_trainer.data.readers import PreferenceRow, PromptRow, SFTRow
from rlhf_trainer.errors import DataError


@dataclass(frozen=True)
class Example:
    """One tokenized sequence. labels: IGNORE_INDEX on prompt tokens, token ids on the response."""

    input_ids: list[int]
    labels: list[int]


def n_targets(example: Example) -> int:
    """The response tokens a loss scores in `example` (as `losses.count_targets` counts them)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token the chat template closes an assistant turn with (ChatML's
    `<|im_end|>`), or None without a template or when that text is not one token."""
    template = getattr(tokenizer, "chat_template", None)
    marker = end_of_turn(template, getattr(tokenizer, "eos_token", None) or "")
    if not marker:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def stop_ids(tokenizer: Any) -> set[int]:
    """Tokens that end a response: EOS and the chat template's end-of-turn token."""
    found = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    return {int(i) for i in found if i is not None}


def too_long(where: str, length: int, max_length: int) -> DataError:
    return DataError(
        f"{where}: the rendered conversation is {length} tokens, longer than "
        f"hyperparameters.maxLength {max_length}; raise maxLength, shorten the row, or set "
        "dataset.skipInvalid to leave such rows out"
    )


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters beyond which a text surely holds more than `max_length` tokens: no token
    spells more characters than the longest entry of the vocabulary, so max_length tokens span
    at most max_length x that many; doubled, so that cutting there leaves the kept tokens as
    the whole text would tokenize them. Spares minutes of tokenizing a row of megabytes."""
    longest = getattr(tokenizer, "_rlhf_longest_token", None)
    if longest is None:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
        tokenizer._rlhf_longest_token = longest  # one pass over the vocabulary per tokenizer
    return 2 * max_length * max(int(longest), 1) + 64


def _chat_example(row: SFTRow, tokenizer: Any, max_length: int, ends: set[int]) -> Example:
    """A chat row as the ids of its whole rendering, so the prompt/response boundary is the
    one the tokenizer draws on the conversation (tokenizing the parts apart can split the
    text around the boundary differently). A token is trained when it lies in the response
    or in an earlier assistant turn (`trained_spans`): a token holding any of their text (one
    that merged the prompt's trailing space with the response's first word, say) is trained."""
    spans = [*row.trained_spans, (len(row.prompt), len(row.prompt) + len(row.response))]
    text = row.prompt + row.response
    if len(text) > char_budget(tokenizer, max_length):
        raise DataError(
            f"{row.where}: the rendered conversation is {len(text)} characters, far more than "
            f"hyperparameters.maxLength {max_length} tokens; shorten the row or set "
            "dataset.skipInvalid to leave such rows out"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(start < b and end > a for a, b in spans) else IGNORE_INDEX
        for t, (start, end) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1] not in ends:
        ids, labels = [*ids, eos], [*labels, eos]
    if len(ids) > max_length:
        raise too_long(row.where, len(ids), max_length)
    return Example(ids, labels)


def tokenize_sft(rows: Sequence[SFTRow], tokenizer: Any, max_length: int) -> list[Example]:
    """prompt + response + EOS (unless it already ends with EOS or the end-of-turn token).

    Plain rows: the prompt gets the tokenizer's own special tokens (e.g. BOS); too long, the
    response keeps up to max_length tokens and the prompt loses tokens from its start, so
    truncation never hides what the model should learn to say. Chat rows (`SFTRow.chat`) were
    rendered by the template with all their special tokens, so none are added, and one that is
    too long is refused: cutting it would cut the template (`_chat_example`).
    """
    ends = stop_ids(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = char_budget(tokenizer, max_length)
    out = []
    for row in rows:
        if row.chat:
            out.append(_chat_example(row, tokenizer, max_length, ends))
            continue
        # Only the prompt's end and the response's start can survive the cut below.
        p = list(tokenizer(row.prompt[-budget:])["input_ids"])
        r = list(tokenizer(row.response[:budget], add_special_tokens=False)["input_ids"])
        r = (r + eos if not r or r[-1] not in ends else r)[:max_length]
        p = p[len(p) - (max_length - len(r)) :] if len(p) + len(r) > max_length else p
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
    chosen = tokenize_sft(
        [SFTRow(r.prompt, r.chosen, chat=r.chat, where=r.where) for r in rows],
        tokenizer,
        max_length,
    )
    rejected = tokenize_sft(
        [SFTRow(r.prompt, r.rejected, chat=r.chat, where=r.where) for r in rows],
        tokenizer,
        max_length,
    )
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


def prompt_token_ids(tokenizer: Any, rows: Sequence[PromptRow], max_len: int) -> list[list[int]]:
    """Token ids of prompts. Plain ones get the tokenizer's special tokens and lose their start
    when long; chat ones (rendered with every special token by the template) get none, and one
    longer than `max_len` is refused: cutting it would cut the template."""
    out = []
    for row in rows:
        ids = list(tokenizer(row.prompt, add_special_tokens=not row.chat)["input_ids"])
        if row.chat and len(ids) > max_len:
            raise DataError(
                f"{row.where}: the rendered prompt is {len(ids)} tokens, more than the "
                f"{max_len} that hyperparameters.maxLength leaves after maxNewTokens; raise "
                "maxLength, shorten the prompt, or set dataset.skipInvalid"
            )
        out.append(ids[-max_len:])
    return out
