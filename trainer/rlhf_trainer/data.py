"""Dataset readers: JSONL files or hub datasets, parsed into typed rows.

Formats (`DatasetSpec.format`):
- `jsonl`: `{prompt, response}`, one supervised example per row.
- `hh`: HH-RLHF `{chosen, rejected}` transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...").
  The prompt is everything up to and including the last "\\n\\nAssistant:"; the rest is the
  response.
- `preference`: `{prompt, chosen, rejected, margin?}`.
- `ranked`: `{prompt, responses: [...], rewards: [...]}`, k responses with a reward each.
- `prompts`: `{prompt, answer?}`, for on-policy stages.

Every row is checked when read, and a bad one raises `DataError` naming the file, the line and the
field. Torch-free, so a whole dataset is validated before any trainer starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from rlhf_trainer.config import DatasetSpec, resolve_path
from rlhf_trainer.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class SFTRow:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class RankedRow:
    prompt: str
    responses: tuple[str, ...]
    rewards: tuple[float, ...]


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    answer: str | None = None


Record = dict[str, Any]
Row = TypeVar("Row")

NEEDS: dict[str, str] = {
    "jsonl": 'each row needs {"prompt", "response"}',
    "hh": 'each row needs {"chosen", "rejected"} HH-RLHF transcripts',
    "preference": 'each row needs {"prompt", "chosen", "rejected"} and an optional number "margin"',
    "ranked": 'each row needs {"prompt", "responses": [strings], "rewards": [numbers]}',
    "prompts": 'each row needs {"prompt"} and an optional string "answer"',
}


def _string(rec: Record, field: str, where: str, fmt: str) -> str:
    if field not in rec:
        raise DataError(f'{where}: missing field "{field}"; {NEEDS[fmt]}')
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(
            f'{where}: field "{field}" must be a string, got {type(value).__name__}; {NEEDS[fmt]}'
        )
    return value


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def split_hh(text: str, field: str, where: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt up to the last Assistant turn, response)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f'{where}: field "{field}" has no "\\n\\nAssistant:" turn; {NEEDS["hh"]}')
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def parse_jsonl(rec: Record, where: str) -> SFTRow:
    return SFTRow(_string(rec, "prompt", where, "jsonl"), _string(rec, "response", where, "jsonl"))


def parse_hh(rec: Record, where: str) -> PreferenceRow:
    prompt, chosen = split_hh(_string(rec, "chosen", where, "hh"), "chosen", where)
    _, rejected = split_hh(_string(rec, "rejected", where, "hh"), "rejected", where)
    return PreferenceRow(prompt, chosen, rejected)


def parse_preference(rec: Record, where: str) -> PreferenceRow:
    margin = rec.get("margin")
    if margin is not None and not _number(margin):
        raise DataError(f'{where}: field "margin" must be a number; {NEEDS["preference"]}')
    return PreferenceRow(
        _string(rec, "prompt", where, "preference"),
        _string(rec, "chosen", where, "preference"),
        _string(rec, "rejected", where, "preference"),
        None if margin is None else float(margin),
    )


def parse_ranked(rec: Record, where: str) -> RankedRow:
    prompt = _string(rec, "prompt", where, "ranked")
    responses, rewards = rec.get("responses"), rec.get("rewards")
    for field, value, ok in (
        ("responses", responses, lambda v: isinstance(v, str)),
        ("rewards", rewards, _number),
    ):
        if not isinstance(value, list) or not value or not all(ok(v) for v in value):
            kind = "strings" if field == "responses" else "numbers"
            raise DataError(
                f'{where}: field "{field}" must be a non-empty list of {kind}; {NEEDS["ranked"]}'
            )
    assert isinstance(responses, list) and isinstance(rewards, list)
    if len(responses) != len(rewards) or len(responses) < 2:
        raise DataError(
            f'{where}: fields "responses" and "rewards" need the same length, at least 2 '
            f"(got {len(responses)} and {len(rewards)}); {NEEDS['ranked']}"
        )
    return RankedRow(prompt, tuple(responses), tuple(float(r) for r in rewards))


def parse_prompts(rec: Record, where: str) -> PromptRow:
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(f'{where}: field "answer" must be a string; {NEEDS["prompts"]}')
    return PromptRow(_string(rec, "prompt", where, "prompts"), answer)


def _file_records(spec: DatasetSpec) -> Iterator[tuple[str, Record]]:
    assert spec.path is not None
    path = resolve_path(spec.path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            f"{spec.path}: dataset file not found (looked at {path}); "
            "set dataset.path to a JSONL file on the workspace volume"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{spec.path}: cannot read the dataset ({err}); check the file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{spec.path} line {number}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(rec).__name__}; {NEEDS[spec.format]}"
            )
        yield where, rec


def _hub_records(spec: DatasetSpec) -> Iterator[tuple[str, Record]]:
    import datasets  # heavy; only hub datasets need it

    assert spec.name is not None
    try:
        ds = datasets.load_dataset(spec.name, split=spec.split, revision=spec.revision)
    except Exception as err:  # the hub raises many kinds; all mean "cannot load this"
        raise DataError(
            f"dataset {spec.name}: cannot load split {spec.split!r} "
            f"(revision {spec.revision or 'default'}): {err}; check dataset.name, split and "
            "revision, and HF_TOKEN for gated datasets"
        ) from None
    for index, rec in enumerate(ds):
        yield f"dataset {spec.name} ({spec.split}) row {index}", dict(rec)


def read_records(spec: DatasetSpec) -> Iterator[tuple[str, Record]]:
    """(where, record) pairs, `where` naming the file and line (or hub row) for messages."""
    return _file_records(spec) if spec.path is not None else _hub_records(spec)


def _read(spec: DatasetSpec, parse: Callable[[Record, str], Row]) -> list[Row]:
    rows = [parse(rec, where) for where, rec in read_records(spec)]
    if not rows:
        raise DataError(f"{spec.path or spec.name}: the dataset has no rows; {NEEDS[spec.format]}")
    return rows


def _unsupported(spec: DatasetSpec, stage: str, allowed: Sequence[str]) -> DataError:
    return DataError(
        f"dataset.format: format {spec.format!r} cannot feed a {stage} stage; "
        f"use one of {', '.join(allowed)}"
    )


def load_sft_rows(spec: DatasetSpec) -> list[SFTRow]:
    """Supervised rows: jsonl as is; hh and preference train on the chosen response."""
    if spec.format == "jsonl":
        return _read(spec, parse_jsonl)
    if spec.format in ("hh", "preference"):
        parse = parse_hh if spec.format == "hh" else parse_preference
        return [SFTRow(r.prompt, r.chosen) for r in _read(spec, parse)]
    raise _unsupported(spec, "sft", ("jsonl", "hh", "preference"))


def load_preference_rows(spec: DatasetSpec) -> list[PreferenceRow]:
    """Pairs for reward models and DPO, from preference or hh data."""
    if spec.format in ("hh", "preference"):
        return _read(spec, parse_hh if spec.format == "hh" else parse_preference)
    raise _unsupported(spec, "preference", ("preference", "hh"))


def load_ranked_rows(spec: DatasetSpec) -> list[RankedRow]:
    """k responses per prompt with rewards (RRHF)."""
    if spec.format == "ranked":
        return _read(spec, parse_ranked)
    raise _unsupported(spec, "ranked", ("ranked",))


def load_prompt_rows(spec: DatasetSpec) -> list[PromptRow]:
    """Prompts for on-policy stages; any format with a prompt will do."""
    if spec.format == "prompts":
        return _read(spec, parse_prompts)
    if spec.format == "hh":
        return [PromptRow(r.prompt) for r in _read(spec, parse_hh)]
    if spec.format == "jsonl":
        return [PromptRow(r.prompt) for r in _read(spec, parse_jsonl)]
    if spec.format == "preference":
        return [PromptRow(r.prompt) for r in _read(spec, parse_preference)]
    return [PromptRow(r.prompt) for r in _read(spec, parse_ranked)]


def split_eval(rows: list[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, eval): the eval share is taken from the end, as DatasetSpec.eval_fraction says."""
    n_eval = int(len(rows) * fraction)
    if fraction > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= len(rows):
        raise DataError(
            f"dataset.evalFraction: {fraction} leaves no training rows out of {len(rows)}; lower it"
        )
    return rows[: len(rows) - n_eval], rows[len(rows) - n_eval :]
