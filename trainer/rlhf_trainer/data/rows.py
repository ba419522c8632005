"""The typed rows every dataset format is parsed into (`formats`), read by `readers`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_trainer.data.chat_format import Message


@dataclass(frozen=True)
class SFTRow:
    prompt: str
    response: str
    # Chat rows: character spans of earlier assistant turns in `prompt`, trained as well.
    trained_spans: tuple[tuple[int, int], ...] = ()
    # Rendered with a chat template: tokenized without the tokenizer's own special tokens (the
    # template wrote them), and never cut: one longer than maxLength is refused, naming `where`.
    chat: bool = False
    where: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    chat: bool = False  # as SFTRow.chat
    where: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class RankedRow:
    prompt: str
    responses: tuple[str, ...]
    rewards: tuple[float, ...] | None  # None: to be scored by a reward model or function
    chat: bool = False  # as SFTRow.chat
    where: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    answer: str | None = None
    messages: tuple[Message, ...] | None = None  # chat rows: the prompt before rendering
    chat: bool = False  # as SFTRow.chat
    where: str = dataclasses.field(default="", compare=False)
    # The row as read (`prompts` rows): what an environment's /reset gets (episodes.py).
    record: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)


Record = dict[str, Any]
Row = TypeVar("Row")


class Rows(list[Row]):
    """Parsed rows, plus how many invalid ones `dataset.skipInvalid` skipped."""

    skipped: int = 0


class Mapped(dict[str, Any]):
    """A record whose columns `dataset.fields` renamed; `names` maps field -> column."""

    names: Mapping[str, str] = {}
