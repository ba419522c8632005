"""Checks that run before a trainer starts: config, model source, batch sizes, every dataset row.

Torch-free and side-effect free: nothing is written anywhere, so a bad input fails in about a
second with one `error:` line, before a process group forms or `output_dir` is created.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rlhf_trainer.config import ModelSource, StageConfig, resolve_path
from rlhf_trainer.data import SFTRow, load_sft_rows, split_eval
from rlhf_trainer.errors import UserError

FINAL_DIR = "final"


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Examples per rank per micro-step; refuses a global batch that does not divide evenly."""
    if batch_size % (world_size * grad_accum):
        raise UserError(
            f"hyperparameters.batchSize: {batch_size} does not divide into {world_size} ranks x "
            f"{grad_accum} gradient-accumulation steps; set batchSize to a multiple of "
            f"{world_size * grad_accum} or change gradientAccumulation"
        )
    return batch_size // (world_size * grad_accum)


def check_model_source(source: ModelSource) -> str:
    """What to pass to from_pretrained: a checked local folder, or the hub id."""
    if source.name is not None:
        return source.name
    assert source.path is not None
    path = resolve_path(source.path)
    if not path.is_dir():
        raise UserError(
            f"model.path: {path} does not exist; point model.path at a Hugging Face model "
            "folder (relative paths hang off the workspace), or build a test model with "
            "`rlhf tiny-model DIR`"
        )
    if not (path / "config.json").is_file():
        raise UserError(
            f"model.path: {path} has no config.json; point model.path at a folder written by "
            "save_pretrained"
        )
    return str(path)


@dataclass(frozen=True)
class SFTInputs:
    """Everything the SFT trainer needs, validated."""

    config: StageConfig
    model_ref: str
    train_rows: list[SFTRow]
    eval_rows: list[SFTRow]
    micro_batch: int
    total_steps: int

    @property
    def output_dir(self) -> Path:
        return resolve_path(self.config.output_dir)


def total_steps(max_steps: int | None, epochs: float, n_rows: int, batch_size: int) -> int:
    """max_steps, else ceil(epochs * rows / batch_size) (at least 1)."""
    if max_steps is not None:
        return max_steps
    # Rounding first keeps float noise (0.1 * 30 / 3 = 1.0000000000000002) from adding a step.
    return max(1, math.ceil(round(epochs * n_rows / batch_size, 9)))


def check_sft(config: StageConfig, world_size: int) -> SFTInputs:
    """Validate an sft stage for `world_size` ranks; raise UserError naming the problem."""
    hp = config.hyperparameters
    if config.dataset is None:
        raise UserError(
            "dataset: the sft stage needs a dataset; set dataset.path (a JSONL file) or "
            "dataset.name (a hub dataset)"
        )
    if config.sft is not None and config.sft.packing:
        raise UserError("sft.packing: packing is not implemented yet; set it to false")
    micro = micro_batch_size(hp.batch_size, world_size, hp.gradient_accumulation)
    model_ref = check_model_source(config.model)
    rows = load_sft_rows(config.dataset)
    train, held_out = split_eval(rows, config.dataset.eval_fraction)
    steps = total_steps(hp.max_steps, hp.epochs, len(train), hp.batch_size)
    return SFTInputs(config, model_ref, train, held_out, micro, steps)
