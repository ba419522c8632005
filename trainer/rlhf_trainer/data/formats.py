"""The dataset formats: one parser per format, from a record to a typed row (`rows`).

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

Every row is checked when parsed: a bad one raises `DataError` naming where it is and the
field. Torch-free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import cast

from rlhf_trainer.config import DatasetSpec
from rlhf_trainer.data import chat_data
from rlhf_trainer.data.chat_format import ChatFormat, Message
from rlhf_trainer.data.rows import (
    Mapped,
    PreferenceRow,
    PromptRow,
    RankedRow,
    Record,
    SFTRow,
)
from rlhf_trainer.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"


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


def renderer_for(chat: ChatFormat | None) -> chat_data.Renderer:
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


def pair_parser(
    spec: DatasetSpec, chat: ChatFormat | None
) -> Callable[[Record, str], PreferenceRow]:
    """The format's pair parser; with a chat template, one whose rows are rendered with it."""
    if spec.format == "chat":
        return functools.partial(parse_chat_pair, r=renderer_for(chat))
    parse = PAIR_PARSERS[spec.format]
    if chat is None or spec.format not in CHAT_CONVERTIBLE:
        return parse
    renderer = renderer_for(chat)
    return lambda rec, where: as_chat(parse(rec, where), spec.format, renderer, where)


CHAT_CONVERTIBLE = ("hh", "shp", "tldr")
PAIRS = (*PAIR_PARSERS, "chat")
