"""Dataset readers: JSONL files or hub datasets, each record parsed by its format
(`formats`) into typed rows (`rows`); the formats are described there.

`dataset.fields` renames columns (format field -> column in the data) before a row is parsed.
Every row is checked when read, and a bad one raises `DataError` naming the file, the line and the
field, or, with `dataset.skipInvalid`, is skipped and counted. Torch-free, so a whole dataset is
validated before any trainer starts.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rlhf_trainer.config import (
    KNOWN_FIELDS,
    READER_FORMATS,
    DatasetSpec,
    ModelSource,
    resolve_path,
)
from rlhf_trainer.data.chat_format import ChatFormat, load_chat_format
from rlhf_trainer.data.formats import (
    CHAT_CONVERTIBLE,
    NEEDS,
    PAIR_PARSERS,
    PAIRS,
    expand_pairs,
    pair_parser,
    parse_chat_pair,
    parse_chat_prompt,
    parse_chat_ranked,
    parse_chat_sft,
    parse_jsonl,
    parse_prompts,
    parse_ranked,
    renderer_for,
)

# The rows and formats, re-exported: `data.readers` is where stages import them from.
from rlhf_trainer.data.rows import Mapped as Mapped
from rlhf_trainer.data.rows import PreferenceRow as PreferenceRow
from rlhf_trainer.data.rows import PromptRow as PromptRow
from rlhf_trainer.data.rows import RankedRow as RankedRow
from rlhf_trainer.data.rows import Record as Record
from rlhf_trainer.data.rows import Row as Row
from rlhf_trainer.data.rows import Rows as Rows
from rlhf_trainer.data.rows import SFTRow as SFTRow
from rlhf_trainer.errors import DataError

log = logging.getLogger(__name__)


def jsonl_lines(data: bytes) -> list[str]:
    """The lines of a JSONL file: UTF-8 (a leading BOM dropped, as the YAML loader does), split
    on "\n" only, a trailing "\r" dropped. Not `str.splitlines`, which also splits on U+2028,
    U+2029, U+0085 and form feeds, characters that `jq -c` and `json.dumps(ensure_ascii=False)`
    leave raw inside strings, and so would cut one valid row into several invalid ones."""
    text = data.decode("utf-8-sig")
    return [line.removesuffix("\r") for line in text.split("\n")]


def _file_records(spec: DatasetSpec) -> Iterator[tuple[str, Record | DataError]]:
    """(where, record) per line; a line that is no JSON object comes as its DataError, so that
    `skipInvalid` can skip it like any other bad row."""
    assert spec.path is not None
    path = resolve_path(spec.path)
    try:
        lines = jsonl_lines(path.read_bytes())
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
            rec = DataError(
                f"{where}: not valid JSON ({err.msg}); each line must be one JSON object"
            )
        if not isinstance(rec, dict | DataError):
            kind = type(rec).__name__
            rec = DataError(f"{where}: expected a JSON object, got {kind}; {NEEDS[spec.format]}")
        yield where, rec


def _hub_records(spec: DatasetSpec) -> Iterator[tuple[str, Record | DataError]]:
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


def read_records(spec: DatasetSpec) -> Iterator[tuple[str, Record | DataError]]:
    """(where, record) pairs, `where` naming the file and line (or hub row) for messages."""
    return _file_records(spec) if spec.path is not None else _hub_records(spec)


def _mapped(rec: Record, fields: Mapping[str, str]) -> Record:
    """The record with `dataset.fields` applied: each field takes its column's value."""
    out = Mapped(rec)
    for field, column in fields.items():
        out.pop(field, None)
        if column in rec:
            out[field] = rec[column]
    out.names = fields
    return out


def _check_fields(spec: DatasetSpec) -> None:
    unknown = sorted(set(spec.fields or {}) - set(KNOWN_FIELDS[spec.format]))
    if unknown:
        raise DataError(
            f"dataset.fields: {', '.join(unknown)} is not a field of format {spec.format!r}; "
            f"map some of {', '.join(KNOWN_FIELDS[spec.format])} to your column names"
        )


def _read(spec: DatasetSpec, parse: Callable[[Record, str], Row]) -> Rows[Row]:
    _check_fields(spec)
    rows: Rows[Row] = Rows()
    first: DataError | None = None
    for where, rec in read_records(spec):
        try:
            if isinstance(rec, DataError):
                raise rec
            rows.append(parse(_mapped(rec, spec.fields) if spec.fields else rec, where))
        except DataError as err:
            if not spec.skip_invalid:
                raise
            rows.skipped += 1
            first = first or err
    if first is not None:
        log.warning(
            "Skipped %d invalid rows of %s (dataset.skipInvalid); the first: %s",
            rows.skipped,
            spec.path or spec.name,
            first,
        )
    if not rows:
        raise DataError(f"{spec.path or spec.name}: the dataset has no rows; {NEEDS[spec.format]}")
    return rows


def _unsupported(spec: DatasetSpec, stage: str, allowed: Sequence[str]) -> DataError:
    return DataError(
        f"dataset.format: format {spec.format!r} cannot feed a {stage} stage; "
        f"use one of {', '.join(allowed)}"
    )


def _derived(rows: Rows[Any], new: list[Row]) -> Rows[Row]:
    out: Rows[Row] = Rows(new)
    out.skipped = rows.skipped
    return out



def load_sft_rows(spec: DatasetSpec, chat: ChatFormat | None = None) -> Rows[SFTRow]:
    """Supervised rows: jsonl as is; chat conversations; pairwise formats train on the chosen
    response. `chat`: the policy's template (`dataset_chat`), for chat rows and conversions."""
    if spec.format == "jsonl":
        return _read(spec, parse_jsonl)
    if spec.format == "chat":
        return _read(spec, functools.partial(parse_chat_sft, r=renderer_for(chat)))
    if spec.format in PAIR_PARSERS:
        pairs = _read(spec, pair_parser(spec, chat))
        sft = [SFTRow(r.prompt, r.chosen, chat=r.chat, where=r.where) for r in pairs]
        return _derived(pairs, sft)
    raise _unsupported(spec, "sft", READER_FORMATS["sft"])


def load_preference_rows(
    spec: DatasetSpec, chat: ChatFormat | None = None
) -> Rows[PreferenceRow]:
    """Pairs for reward models and DPO; ranked rows expand into all their ordered pairs."""
    if spec.format == "chat":  # pairs, or ranked rows (with `responses`) expanded
        r = renderer_for(chat)
        rows = _read(
            spec,
            lambda rec, where: expand_pairs(parse_chat_ranked(rec, where, r))
            if "responses" in rec
            else [parse_chat_pair(rec, where, r)],
        )
        return _derived(rows, [pair for group in rows for pair in group])
    if spec.format in PAIRS:
        return _read(spec, pair_parser(spec, chat))
    if spec.format == "ranked":
        ranked = _read(spec, parse_ranked)
        return _derived(ranked, [pair for row in ranked for pair in expand_pairs(row)])
    raise _unsupported(spec, "preference", READER_FORMATS["preference"])


def load_ranked_rows(
    spec: DatasetSpec, need_rewards: bool = True, chat: ChatFormat | None = None
) -> Rows[RankedRow]:
    """k responses per prompt (RRHF). A pair becomes k = 2 with rewards (1, 0). Without
    `need_rewards`, ranked rows may leave out `rewards` (None) for a scorer to fill in. Chat
    rows with `responses` are ranked rows; chat rows with chosen/rejected are pairs."""
    if spec.format == "ranked":
        return _read(spec, functools.partial(parse_ranked, need_rewards=need_rewards))
    if spec.format == "chat":
        r = renderer_for(chat)

        def parse(rec: Record, where: str) -> RankedRow:
            if "responses" in rec:
                return parse_chat_ranked(rec, where, r, need_rewards)
            pair = parse_chat_pair(rec, where, r)
            return RankedRow(pair.prompt, (pair.chosen, pair.rejected), (1.0, 0.0), True, where)

        return _read(spec, parse)
    if spec.format in PAIR_PARSERS:
        pairs = _read(spec, pair_parser(spec, chat))
        ranked = [
            RankedRow(r.prompt, (r.chosen, r.rejected), (1.0, 0.0), r.chat, r.where) for r in pairs
        ]
        return _derived(pairs, ranked)
    raise _unsupported(spec, "ranked", READER_FORMATS["ranked"])


def load_prompt_rows(spec: DatasetSpec, chat: ChatFormat | None = None) -> Rows[PromptRow]:
    """Prompts for on-policy stages and evaluation; any format with a prompt will do."""
    if spec.format == "prompts":
        return _read(spec, parse_prompts)
    if spec.format == "chat":
        return _read(spec, functools.partial(parse_chat_prompt, r=renderer_for(chat)))
    parse: Callable[[Record, str], SFTRow | PreferenceRow | RankedRow]
    if spec.format == "jsonl":
        parse = parse_jsonl
    elif spec.format == "ranked":
        parse = functools.partial(parse_ranked, need_rewards=False)
    else:
        parse = pair_parser(spec, chat)
    rows: Rows[SFTRow | PreferenceRow | RankedRow] = _read(spec, parse)
    # A pair's chosen response is the reference answer (the judge's pairwise rewards use it).
    prompts = [
        PromptRow(
            r.prompt, r.chosen if isinstance(r, PreferenceRow) else None, None, r.chat, r.where
        )
        for r in rows
    ]
    return _derived(rows, prompts)


def dataset_chat(spec: DatasetSpec, model: ModelSource) -> ChatFormat | None:
    """The chat template a dataset's rows are rendered with: the model's, for `chat` rows (a
    model without one is refused when they are read) and, with `dataset.applyChatTemplate`,
    for hh, shp and tldr rows when the model has one; None for plain rows."""
    if spec.format == "chat":
        return load_chat_format(model)
    if spec.format in CHAT_CONVERTIBLE and spec.apply_chat_template:
        chat = load_chat_format(model)
        return chat if chat.template is not None else None
    return None


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
