"""Every later stage's file checks, before a run's first stage starts.

A stage's own preflight (preflight.py) runs when its process starts, after every earlier
stage has trained. `rlhf run` calls `check_stages` first instead, so a bad row in the last
stage's dataset, a chat template missing from its model, or a batch larger than its data is
reported before any GPU time is spent.

The weights a stage starts from are often an earlier stage's `final/`, which does not exist
yet: such a folder stands in as the run's base model, whose tokenizer and chat template an
SFT, DPO or reward stage copies into its output. A dataset written during the run (a feedback
stage's pairs) cannot be read yet; its stage is checked when it starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_trainer.config import (
    STAGES,
    ConfigError,
    ModelSource,
    StageConfig,
    load_stage_config,
    online_options,
    resolve_path,
    samples_online,
)
from rlhf_trainer.data.inputs import StageInputs
from rlhf_trainer.data.readers import SFTRow
from rlhf_trainer.errors import UserError


@dataclass(frozen=True)
class StageProblem:
    stage: str
    message: str


def _missing(path: str | None) -> bool:
    return path is not None and not resolve_path(path).exists()


def with_stand_ins(config: StageConfig, base: str) -> StageConfig | None:
    """The config with not-yet-written model folders replaced by the base model (a local
    folder or a hub id); None when a folder-only field (a reward model, an evaluated policy)
    would need a hub id."""
    local = resolve_path(base).is_dir()
    update: dict[str, object] = {}
    if _missing(config.model.path):
        update["model"] = ModelSource(path=base) if local else ModelSource(name=base)
    folders = [config.reward_model_path, *(config.policies or {}).values()]
    if any(_missing(path) for path in folders):
        if not local:
            return None
        if _missing(config.reward_model_path):
            update["reward_model_path"] = base
        if config.policies:
            update["policies"] = {k: base if _missing(v) else v for k, v in config.policies.items()}
    return config.model_copy(update=update)


def _dataset_paths(config: StageConfig) -> list[Path]:
    """The local dataset files the stage reads."""
    specs = [config.dataset]
    if config.dataset is not None:
        specs.append(config.dataset.held_out())
    if config.ppo is not None:
        specs.append(config.ppo.ptx_dataset)
    if config.evaluate is not None:
        specs += [config.evaluate.reference_dataset, config.evaluate.preference_dataset]
    return [resolve_path(s.path) for s in specs if s is not None and s.path is not None]


def check_stage(config: StageConfig, world_size: int, base: str) -> str | None:
    """Run the stage's own preflight check on its files; None when it passes or when its data
    is written during the run (then it is checked when the stage starts)."""
    from rlhf_trainer import preflight

    planned = with_stand_ins(config, base)
    if planned is None or any(not path.exists() for path in _dataset_paths(config)):
        return None  # an earlier stage writes it: the stage checks it when it starts
    try:
        inputs = getattr(preflight, STAGES[config.type].check)(planned, world_size)
        if isinstance(inputs, StageInputs):
            tokenize(inputs)
    except UserError as err:
        return str(err)
    return None


def tokenize(inputs: StageInputs[Any]) -> None:
    """Tokenize every row as the stage's trainer will (a row too long for maxLength fails
    here; an online stage tokenizes its prompts only when it draws them, step after step)."""
    from rlhf_trainer.data.batching import prompt_token_ids, tokenize_pairs, tokenize_sft
    from rlhf_trainer.models.causal_lm import load_tokenizer

    config = inputs.config
    rows = [*inputs.train_rows, *inputs.eval_rows]
    tokenizer = load_tokenizer(config.model, inputs.model_ref)
    max_length = config.hyperparameters.max_length
    if samples_online(config):  # a grpo stage without a `grpo` block too: its defaults
        max_new_tokens = online_options(config).max_new_tokens
        prompt_token_ids(tokenizer, rows, max_length - max_new_tokens)
    elif config.type == "sft":
        tokenize_sft(rows, tokenizer, max_length)
    elif config.type in ("reward", "dpo"):
        tokenize_pairs(rows, tokenizer, max_length)
    elif config.type == "rrhf":  # each response after the prompt, as rrhf.tokenize_queries
        flat = [SFTRow(r.prompt, y, chat=r.chat, where=r.where) for r in rows for y in r.responses]
        tokenize_sft(flat, tokenizer, max_length)


def check_stages(paths: Iterable[str], world_size: int, base: str) -> list[StageProblem]:
    """Each stage config's problems, in order."""
    problems = []
    for path in paths:
        try:
            config = load_stage_config(path)
        except ConfigError as err:
            problems.append(StageProblem(Path(path).stem, "; ".join(str(err).splitlines())))
            continue
        message = check_stage(config, world_size, base)
        if message is not None:
            problems.append(StageProblem(config.stage or Path(path).stem, message))
    return problems
