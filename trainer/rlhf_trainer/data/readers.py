"""Dataset readers: JSONL files or hub datasets, parsed into typed rows.

Formats (`DatasetSpec.format`):
- `jsonl`: `{prompt, response}`, one supervised example per row.
- `hh`: HH-RLHF `{chosen, rejected}` transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...").
  The prompt is everything up to and including the last "\\n\\nAssistant:"; the rest is the
  response.
- `preference`: `{prompt, chosen, rejected, margin?}`.
- `ranked`: `{prompt, responses: [...], rewards: [...]}`, k responses with a reward each. For
  pairwise stages it expands into every ordered pair (r_i > r_j, margin r_i - r_j); `rewards` may
  be left out where a reward model or function scores the responses.
- `prompts`: `{prompt, answer?}`, for on-policy stages (which read the prompts of any format;
  the reference answer of a pair format is its chosen response).
- `shp`: Stanford SHP `{history, human_ref_A, human_ref_B, labels}` (labels 1: A is preferred);
  the prompt is the history, the responses " " + the reference comment.
- `tldr`: OpenAI summarize-from-feedback comparisons `{info: {post, title, subreddit}, summaries:
  [{text}, {text}], choice}`; the prompt is "SUBREDDIT: r/..\n\nTITLE: ..\n\nPOST: ..\n\nTL;DR:".
- `chat`: TRL's conversational rows, lists of `{role, content}` messages, rendered with the
  policy's chat template (`chat_data`). `hh`, `shp` and `tldr` rows become chat turns too when
  the loader is given a template (the model has one and `dataset.applyChatTemplate` is on).

`dataset.fields` renames columns (format field -> column in the data) before a row is parsed.
Every row is checked when read, and a bad one raises `DataError` naming the file, the line and the
field, or, with `dataset.skipInvalid`, is skipped and counted. Torch-free, so a whole dataset is
validated before any trainer starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from rlhf_trainer.config import (
    KNOWN_FIELDS,
    READER_FORMATS,
    DatasetSpec,
    ModelSource,
    resolve_path,
)
from rlhf_trainer.data import chat_data
from rlhf_trainer.data.chat_format import ChatFormat, Message, load_chat_format
from rlhf_trainer.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"

log = logging.getLogger(__name__)


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


NEEDS: dict[str, str] = {
    "jsonl": 'each row needs {"prompt", "response"}',
    "hh": 'each row needs {"chosen", "rejected"} HH-RLHF transcripts',
    "preference": 'each row needs {"prompt", "chosen", "rejected"} and an optional number "margin"',
    "ranked": 'each row needs {"prompt", "responses": [strings], "rewards": [numbers]}',
    "prompts": 'each row needs {"prompt"} and an optional string "answer"',
    "shp": 'each row needs {"history", "human_ref_A", "human_ref_B", "labels": 0 or 1}',
    "tldr": 'each row needs {"info": {"post", "title"?, "subreddit"?}, "summaries": '
    '[{"text"}, {"text"}], "choice": 0 or 1}',
    "chat": chat_data.NEEDS_CHAT,
}


def _name(rec: Record, field: str) -> str:
    """How a message names a field: its column, and the mapping that renamed it."""
    column = rec.names.get(field) if isinstance(rec, Mapped) else None
    return f'"{column}" (dataset.fields.{field})' if column else f'"{field}"'


def _string(rec: Record, field: str, where: str, fmt: str) -> str:
    if field not in rec:
        raise DataError(f"{where}: missing field {_name(rec, field)}; {NEEDS[fmt]}")
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {_name(rec, field)} must be a string, got {type(value).__name__}; "
            f"{NEEDS[fmt]}"
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
    """Both transcripts must share the conversation before their last Assistant turn: that is
    the prompt the two replies answer. Rows where it differs are refused (with `skipInvalid`,
    skipped and counted) rather than paired under the chosen side's prompt."""
    prompt, chosen = split_hh(_string(rec, "chosen", where, "hh"), "chosen", where)
    other, rejected = split_hh(_string(rec, "rejected", where, "hh"), "rejected", where)
    if other != prompt:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other, strict=False)) if a != b), None)
        at = min(len(prompt), len(other)) if at is None else at
        raise DataError(
            f'{where}: fields "chosen" and "rejected" differ before their last Assistant turn '
            f"(from character {at}), so they answer different prompts; fix the row or set "
            "dataset.skipInvalid: true to skip such rows"
        )
    return PreferenceRow(prompt, chosen, rejected)


def parse_preference(rec: Record, where: str) -> PreferenceRow:
    margin = rec.get("margin")
    if margin is not None and not _number(margin):
        raise DataError(
            f"{where}: field {_name(rec, 'margin')} must be a number; {NEEDS['preference']}"
        )
    return PreferenceRow(
        _string(rec, "prompt", where, "preference"),
        _string(rec, "chosen", where, "preference"),
        _string(rec, "rejected", where, "preference"),
        None if margin is None else float(margin),
    )


def parse_ranked(rec: Record, where: str, need_rewards: bool = True) -> RankedRow:
    prompt = _string(rec, "prompt", where, "ranked")
    responses, rewards = rec.get("responses"), rec.get("rewards")
    if rewards is None and not need_rewards:
        rewards = [0.0] * len(responses) if isinstance(responses, list) else None
        scored = False
    else:
        scored = True
    for field, value, ok in (
        ("responses", responses, lambda v: isinstance(v, str)),
        ("rewards", rewards, _number),
    ):
        if not isinstance(value, list) or not value or not all(ok(v) for v in value):
            kind = "strings" if field == "responses" else "numbers"
            raise DataError(
                f"{where}: field {_name(rec, field)} must be a non-empty list of {kind}; "
                f"{NEEDS['ranked']}"
            )
    assert isinstance(responses, list) and isinstance(rewards, list)
    if len(responses) != len(rewards) or len(responses) < 2:
        raise DataError(
            f'{where}: fields "responses" and "rewards" need the same length, at least 2 '
            f"(got {len(responses)} and {len(rewards)}); {NEEDS['ranked']}"
        )
    return RankedRow(prompt, tuple(responses), tuple(float(r) for r in rewards) if scored else None)


def _choice(rec: Record, field: str, where: str, fmt: str) -> int:
    value = rec.get(field)
    if value not in (0, 1) or isinstance(value, bool | float):
        raise DataError(f"{where}: field {_name(rec, field)} must be 0 or 1; {NEEDS[fmt]}")
    return int(value)


def parse_shp(rec: Record, where: str) -> PreferenceRow:
    history = _string(rec, "history", where, "shp")
    a = _string(rec, "human_ref_A", where, "shp")
    b = _string(rec, "human_ref_B", where, "shp")
    if _choice(rec, "labels", where, "shp") == 1:
        return PreferenceRow(history, f" {a}", f" {b}")
    return PreferenceRow(history, f" {b}", f" {a}")


def parse_tldr(rec: Record, where: str) -> PreferenceRow:
    info, summaries = rec.get("info"), rec.get("summaries")
    post = info.get("post") or info.get("article") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not isinstance(post, str):
        raise DataError(
            f'{where}: field {_name(rec, "info")} needs a string "post"; {NEEDS["tldr"]}'
        )
    items = summaries if isinstance(summaries, list) else []
    texts = [s["text"] for s in items if isinstance(s, dict) and isinstance(s.get("text"), str)]
    if len(items) != 2 or len(texts) != 2:
        raise DataError(
            f'{where}: field {_name(rec, "summaries")} must hold two {{"text": string}}; '
            f"{NEEDS['tldr']}"
        )
    choice = _choice(rec, "choice", where, "tldr")
    head = f"SUBREDDIT: r/{info.get('subreddit') or ''}\n\nTITLE: {info.get('title') or ''}"
    prompt = f"{head}\n\nPOST: {post}\n\nTL;DR:"
    return PreferenceRow(prompt, f" {texts[choice].strip()}", f" {texts[1 - choice].strip()}")


PAIR_PARSERS: dict[str, Callable[[Record, str], PreferenceRow]] = {
    "hh": parse_hh,
    "preference": parse_preference,
    "shp": parse_shp,
    "tldr": parse_tldr,
}


def expand_pairs(row: RankedRow) -> list[PreferenceRow]:
    """Every ordered pair of a ranked row: (i, j) with r_i > r_j, margin r_i - r_j."""
    assert row.rewards is not None
    scored = list(zip(row.responses, row.rewards, strict=True))
    return [
        PreferenceRow(row.prompt, a, b, ra - rb, row.chat, row.where)
        for a, ra in scored
        for b, rb in scored
        if ra > rb
    ]


def parse_prompts(rec: Record, where: str) -> PromptRow:
    answer = rec.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise DataError(
            f"{where}: field {_name(rec, 'answer')} must be a string; {NEEDS['prompts']}"
        )
    return PromptRow(_string(rec, "prompt", where, "prompts"), answer, record=rec)


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


def _renderer(chat: ChatFormat | None) -> chat_data.Renderer:
    return chat_data.Renderer(chat if chat is not None else ChatFormat())


def parse_chat_sft(rec: Record, where: str, r: chat_data.Renderer) -> SFTRow:
    """`messages` train every assistant turn; `prompt` + `completion` the completion alone."""
    messages = chat_data.sft_messages(rec, where)
    if "messages" in rec:
        prompt, response, spans = r.conversation(messages, where)
        return SFTRow(prompt, response, tuple(spans), chat=True, where=where)
    prompt, response = r.reply(messages[:-1], messages[-1], where)
    return SFTRow(prompt, response, chat=True, where=where)


def parse_chat_pair(rec: Record, where: str, r: chat_data.Renderer) -> PreferenceRow:
    prompt, chosen, rejected = chat_data.pair_messages(rec, where)
    text, chosen_text = r.reply(prompt, chosen, where)
    margin = parse_preference({**rec, "prompt": "", "chosen": "", "rejected": ""}, where).margin
    return PreferenceRow(
        text, chosen_text, r.reply(prompt, rejected, where)[1], margin, chat=True, where=where
    )


def parse_chat_ranked(
    rec: Record, where: str, r: chat_data.Renderer, need_rewards: bool = True
) -> RankedRow:
    prompt, replies = chat_data.ranked_messages(rec, where)
    texts = [r.reply(prompt, reply, where)[1] for reply in replies]
    plain = {"prompt": r.prompt(prompt), "responses": texts, "rewards": rec.get("rewards")}
    row = parse_ranked(plain, where, need_rewards)
    return RankedRow(row.prompt, row.responses, row.rewards, chat=True, where=where)


def parse_chat_prompt(rec: Record, where: str, r: chat_data.Renderer) -> PromptRow:
    prompt, answer = chat_data.prompt_messages(rec, where)
    return PromptRow(r.prompt(prompt), answer, tuple(prompt), chat=True, where=where)


def as_chat(row: PreferenceRow, fmt: str, r: chat_data.Renderer, where: str) -> PreferenceRow:
    """An hh, shp or tldr pair as chat turns: the prompt as the user's (hh: every turn), the
    responses as the assistant's, rendered with the template."""
    if fmt == "hh":
        prompt = chat_data.hh_messages(row.prompt)
    else:
        prompt = [cast(Message, {"role": "user", "content": row.prompt.strip()})]
    chosen, rejected = (
        cast(Message, {"role": "assistant", "content": text.strip()})
        for text in (row.chosen, row.rejected)
    )
    text, chosen_text = r.reply(prompt, chosen, where)
    rejected_text = r.reply(prompt, rejected, where)[1]
    return PreferenceRow(text, chosen_text, rejected_text, row.margin, chat=True, where=where)


def _pair_parser(
    spec: DatasetSpec, chat: ChatFormat | None
) -> Callable[[Record, str], PreferenceRow]:
    """The format's pair parser; with a chat template, one whose rows are rendered with it."""
    if spec.format == "chat":
        return functools.partial(parse_chat_pair, r=_renderer(chat))
    parse = PAIR_PARSERS[spec.format]
    if chat is None or spec.format not in CHAT_CONVERTIBLE:
        return parse
    renderer = _renderer(chat)
    return lambda rec, where: as_chat(parse(rec, where), spec.format, renderer, where)


CHAT_CONVERTIBLE = ("hh", "shp", "tldr")
PAIRS = (*PAIR_PARSERS, "chat")


def load_sft_rows(spec: DatasetSpec, chat: ChatFormat | None = None) -> Rows[SFTRow]:
    """Supervised rows: jsonl as is; chat conversations; pairwise formats train on the chosen
    response. `chat`: the policy's template (`dataset_chat`), for chat rows and conversions."""
    if spec.format == "jsonl":
        return _read(spec, parse_jsonl)
    if spec.format == "chat":
        return _read(spec, functools.partial(parse_chat_sft, r=_renderer(chat)))
    if spec.format in PAIR_PARSERS:
        pairs = _read(spec, _pair_parser(spec, chat))
        sft = [SFTRow(r.prompt, r.chosen, chat=r.chat, where=r.where) for r in pairs]
        return _derived(pairs, sft)
    raise _unsupported(spec, "sft", READER_FORMATS["sft"])


def load_preference_rows(
    spec: DatasetSpec, chat: ChatFormat | None = None
) -> Rows[PreferenceRow]:
    """Pairs for reward models and DPO; ranked rows expand into all their ordered pairs."""
    if spec.format == "chat":  # pairs, or ranked rows (with `responses`) expanded
        r = _renderer(chat)
        rows = _read(
            spec,
            lambda rec, where: expand_pairs(parse_chat_ranked(rec, where, r))
            if "responses" in rec
            else [parse_chat_pair(rec, where, r)],
        )
        return _derived(rows, [pair for group in rows for pair in group])
    if spec.format in PAIRS:
        return _read(spec, _pair_parser(spec, chat))
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
        r = _renderer(chat)

        def parse(rec: Record, where: str) -> RankedRow:
            if "responses" in rec:
                return parse_chat_ranked(rec, where, r, need_rewards)
            pair = parse_chat_pair(rec, where, r)
            return RankedRow(pair.prompt, (pair.chosen, pair.rejected), (1.0, 0.0), True, where)

        return _read(spec, parse)
    if spec.format in PAIR_PARSERS:
        pairs = _read(spec, _pair_parser(spec, chat))
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
        return _read(spec, functools.partial(parse_chat_prompt, r=_renderer(chat)))
    parse: Callable[[Record, str], SFTRow | PreferenceRow | RankedRow]
    if spec.format == "jsonl":
        parse = parse_jsonl
    elif spec.format == "ranked":
        parse = functools.partial(parse_ranked, need_rewards=False)
    else:
        parse = _pair_parser(spec, chat)
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
