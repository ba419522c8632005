"""What a stage's check (rlhf_trainer.preflight) hands its trainer: validated rows and sizes.

A layer below the stages, so that trainers and the checks that feed them do not import each
other. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic

from rlhf_trainer.config import DatasetSpec, StageConfig, resolve_path
from rlhf_trainer.data.chat_format import ChatFormat
from rlhf_trainer.data.readers import PreferenceRow, PromptRow, Row, SFTRow
from rlhf_trainer.errors import UserError

FINAL_DIR = "final"
Loader = Callable[[DatasetSpec, ChatFormat | None], list[Row]]  # a data.load_*_rows


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Examples per rank per micro-step; refuses a global batch that does not divide evenly."""
    if batch_size % (world_size * grad_accum):
        raise UserError(
            f"hyperparameters.batchSize: {batch_size} does not divide into {world_size} ranks x "
            f"{grad_accum} gradient-accumulation steps; set batchSize to a multiple of "
            f"{world_size * grad_accum} or change gradientAccumulation"
        )
    return batch_size // (world_size * grad_accum)


@dataclass(frozen=True)
class StageInputs(Generic[Row]):
    """Everything a trainer needs, validated."""

    config: StageConfig
    model_ref: str
    train_rows: list[Row]
    eval_rows: list[Row]
    micro_batch: int
    total_steps: int
    reward_model_ref: str | None = None  # scores rrhf responses that come without rewards
    skipped_rows: int = 0  # invalid rows left out (dataset.skipInvalid)

    @property
    def output_dir(self) -> Path:
        return resolve_path(self.config.output_dir)


SFTInputs = StageInputs[SFTRow]


@dataclass(frozen=True)
class EvalInputs:
    """An evaluation: policies to compare on prompts, and what to measure them with."""

    policies: dict[str, str]  # name -> model folder or hub id
    prompts: list[PromptRow]
    reference_model: str | None = None  # KL reference policy
    reward_model: str | None = None
    reward_function: str | None = None
    reference_rows: list[SFTRow] = field(default_factory=list)  # perplexity set
    pairs: list[PreferenceRow] = field(default_factory=list)  # reward-model accuracy
    max_new_tokens: int = 64
    batch_size: int = 16
    max_length: int = 512
    output_dir: Path | None = None  # evaluate stage: writes final/eval.json there
