"""The training loop every offline trainer shares (sft, reward, dpo, rrhf).

A trainer supplies an `Objective`: `train_step` runs forward/backward of one global batch (given as
example indices) on this rank's slices and returns the step's global loss and metrics;
`evaluate` returns held-out metrics (keys `eval_*`). The loop owns the rest, identically for
every algorithm: AdamW and the LR schedule, gradient clipping, the deterministic data order,
atomic checkpoints every `saveEvery` steps (model, optimizer, scheduler, RNG and data position)
with automatic resume, progress.json and metrics.jsonl, and writing `final/`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR

from rlhf_trainer.config import Hyperparameters
from rlhf_trainer.data.batching import DataStream, rank_micro_batches
from rlhf_trainer.data.inputs import FINAL_DIR, StageInputs
from rlhf_trainer.errors import NonFiniteError
from rlhf_trainer.models.causal_lm import Exporter, save_final
from rlhf_trainer.runtime import checkpoint
from rlhf_trainer.runtime.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_object,
    close_distributed,
    init_distributed,
)
from rlhf_trainer.runtime.launch_env import env_rank
from rlhf_trainer.runtime.memory import check_step_fits
from rlhf_trainer.runtime.progress import ProgressReporter, read_metrics
from rlhf_trainer.runtime.schedule import lr_factor

log = logging.getLogger(__name__)

# Devices with torch's fused AdamW kernel that the trainer runs on.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class StepResult:
    loss: float  # global mean loss of the step
    tokens: float  # non-pad tokens processed by all ranks
    metrics: dict[str, float] = field(default_factory=dict)  # further global metrics


class Objective(Protocol):
    def train_step(self, batch: list[int]) -> StepResult:
        """Forward/backward of one global batch of example indices; collective."""
        ...

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (`eval_*` keys), {} without held-out data; collective."""
        ...


@dataclass
class Trainable:
    """What a trainer prepares for the loop: the sharded model, its objective, how to save."""

    model: nn.Module
    objective: Objective
    tokenizer: Any
    dtype: torch.dtype  # the dtype final/ is written in
    export: Exporter | None = None  # default: a causal LM
    eval_at_start: bool = False  # log held-out metrics at step 0, before any update
    sequences: int = 1  # sequences an example runs as (a preference pair: 2), for memory.py


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    tokens: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.steps, self.loss = self.steps + 1, self.loss + result.loss
        self.tokens += result.tokens
        for key, value in result.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        n = max(self.steps, 1)
        out = {"loss": self.loss / n, "tokens_per_s": self.tokens / elapsed}
        return out | {k: v / n for k, v in self.metrics.items()}


# One micro-batch's work: (summed loss to backpropagate, further sums to report).
MicroStep = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


def backward_micro_batches(
    model: nn.Module,
    batch: list[int],
    ctx: DistContext,
    grad_accum: int,
    step: MicroStep,
    scale: float,
) -> dict[str, float]:
    """Run `step` on this rank's micro-batches of a global batch and backpropagate each summed loss
    times `scale` (1 / the global count it is a mean over: tokens, pairs, queries). FSDP averages
    gradients over ranks; scaling by the world size as well turns that into the global sum, so
    the gradient does not depend on how the batch is split. Returns the global sums (all ranks,
    all micro-batches) of `loss` and of every key `step` reports."""
    micro_batches = rank_micro_batches(batch, ctx.world_size, ctx.rank, grad_accum)
    return backward_rank_micro_batches(model, micro_batches, ctx, step, scale)


def backward_rank_micro_batches(
    model: nn.Module,
    micro_batches: list[list[int]],
    ctx: DistContext,
    step: MicroStep,
    scale: float,
) -> dict[str, float]:
    """`backward_micro_batches` for micro-batches this rank has already picked (every rank the
    same number): indices are the rank's own, e.g. into the rollouts it holds."""
    totals: dict[str, float] = {}
    for m, indices in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # a plain module (one process) has no sync to defer
            model.set_requires_gradient_sync(m == len(micro_batches) - 1)
        loss_sum, sums = step(indices)
        scaled: torch.Tensor = loss_sum * (ctx.world_size * scale)
        scaled.backward()  # type: ignore[no-untyped-call]
        for key, value in {"loss": float(loss_sum.detach()), **sums}.items():
            totals[key] = totals.get(key, 0.0) + value
    keys = sorted(totals)
    return dict(zip(keys, all_reduce_sum([totals[k] for k in keys], ctx.device), strict=True))


@torch.no_grad()
def evaluate_rounds(
    model: nn.Module,
    n: int,
    ctx: DistContext,
    micro: int,
    step: Callable[[list[int], list[bool]], dict[str, float]],
) -> dict[str, float]:
    """Global sums of what `step` reports over examples 0..n-1, each rank taking a slice of
    `micro` per round. Every rank runs the same number of forwards (FSDP gathers weights
    collectively), so past the end `step` gets index 0 with `real` False, to be weighed as 0."""
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, n, ctx.world_size * micro):
        mine = [start + ctx.rank * micro + j for j in range(micro)]
        real = [i < n for i in mine]
        for key, value in step([i if i < n else 0 for i in mine], real).items():
            totals[key] = totals.get(key, 0.0) + value
    model.train()
    keys = sorted(totals)
    return dict(zip(keys, all_reduce_sum([totals[k] for k in keys], ctx.device), strict=True))


def build_optimizer(
    model: nn.Module, hp: Hyperparameters, total: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW with weight decay on matrices only (not norms or biases), and the LR schedule.

    The fused AdamW kernel where torch has one for the parameters' device: on CPU, torch's
    default is a Python loop over the parameters, whose step took 5.8x as long (median) on the 20m
    preset (docs/BENCHMARKS.md); the result is the same to float32 rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(
        groups, lr=hp.learning_rate, betas=hp.adam_betas, fused=fused or None
    )
    factor = functools.partial(
        lr_factor, warmup_steps=hp.warmup_steps, total_steps=total, kind=hp.lr_scheduler
    )
    return optimizer, LambdaLR(optimizer, factor)


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    """Global grad norm over all (DTensor) shards; clips to `max_norm` unless it is 0."""
    limit = max_norm if max_norm > 0 else float("inf")
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    value = float(full)
    if not math.isfinite(value):
        # Stepping would write NaN into every weight, and later stages start from them.
        raise NonFiniteError(
            f"training: the gradient norm is {value} (a non-finite loss or gradient); the "
            "stage stopped before the optimizer step, with the last checkpoint intact; lower "
            "hyperparameters.learningRate, check the data, or use bf16: false"
        )
    return value


def resume(
    inputs: StageInputs[Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    ctx: DistContext,
) -> tuple[int, DataStream]:
    """Load the newest complete checkpoint if there is one; return (step, data stream)."""
    root = inputs.output_dir / "checkpoints"
    hp = inputs.config.hyperparameters
    fresh = DataStream(len(inputs.train_rows), hp.seed, shuffle=hp.shuffle)
    latest = None
    if ctx.is_main:
        for partial in checkpoint.remove_partial(root):
            log.warning("Removed incomplete checkpoint %s", partial.name)
        found = checkpoint.latest_checkpoint(root)
        latest = str(found) if found else None
    latest = cast(str | None, broadcast_object(latest))
    if latest is None:
        return 0, fresh
    state = checkpoint.load_checkpoint(Path(latest), model, optimizer, ctx)
    scheduler.load_state_dict(state["scheduler"])
    stream = fresh.at(state["epoch"], state["index"])
    log.info(
        "Resumed from checkpoint %s at step %d (epoch %.3f)",
        Path(latest).name,
        state["step"],
        stream.epochs_done,
    )
    return int(state["step"]), stream


def log_step(
    reporter: ProgressReporter,
    step: int,
    total: int,
    epoch: float,
    window: Window,
    extra: dict[str, float],
) -> None:
    metrics = window.means() | extra
    reporter.log(step, epoch, metrics)
    known = {"loss", "tokens_per_s", "learning_rate", "grad_norm"}
    rest = "".join(
        f", {key.replace('_', ' ')} {value:.4g}"
        for key, value in metrics.items()
        if key not in known
    )
    log.info(
        "Step %d/%d: loss %.4f, lr %.2e, grad norm %.3f, %.0f tokens/s%s",
        step,
        total,
        metrics["loss"],
        metrics["learning_rate"],
        metrics["grad_norm"],
        metrics["tokens_per_s"],
        rest,
    )


def _save(
    inputs: StageInputs[Any],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    stream: DataStream,
    ctx: DistContext,
) -> None:
    state: dict[str, Any] = {"epoch": stream.epoch, "index": stream.index}
    state["scheduler"] = scheduler.state_dict()
    hp = inputs.config.hyperparameters
    checkpoint.save_checkpoint(
        inputs.output_dir / "checkpoints", step, model, optimizer, state, ctx, hp.keep_checkpoints
    )


def train_loop(inputs: StageInputs[Any], ctx: DistContext, trainable: Trainable) -> None:
    """Optimizer steps from the last checkpoint (or 0) to `inputs.total_steps`."""
    hp, model, objective = inputs.config.hyperparameters, trainable.model, trainable.objective
    total = inputs.total_steps
    optimizer, scheduler = build_optimizer(model, hp, total)
    step, stream = resume(inputs, model, optimizer, scheduler, ctx)
    if step < total:
        rows = inputs.micro_batch * trainable.sequences
        check_step_fits([model], hp, rows, ctx.world_size, ctx.device, ctx.bf16)
    reporter = ProgressReporter(inputs.output_dir, total, ctx.is_main)
    reporter.truncate_after(step)
    if step == 0 and trainable.eval_at_start:
        start = objective.evaluate()
        reporter.log(0, 0.0, start)
        log.info("Before training: %s", ", ".join(f"{k} {v:.4g}" for k, v in start.items()))
    window = Window()
    while step < total:
        lr = float(scheduler.get_last_lr()[0])
        result = objective.train_step(stream.next_batch(hp.batch_size))
        norm = grad_norm_and_clip(model, hp.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(result)
        save = step % hp.save_every == 0 and step < total
        extra = {"learning_rate": lr, "grad_norm": norm}
        if save or step == total:
            extra |= objective.evaluate()
        if step % hp.log_every == 0 or step == total or len(extra) > 2:
            log_step(reporter, step, total, stream.epochs_done, window, extra)
            window = Window()
        if save:
            _save(inputs, step, model, optimizer, scheduler, stream, ctx)
    if window.steps == 0 and ctx.is_main:  # resumed at the very end: keep the last metrics
        last = read_metrics(reporter.metrics_path)[-1:] or [{}]
        reporter.write_progress(total, stream.epochs_done, last[0])


def finished(output_dir: Path) -> bool:
    """Whether the stage already wrote final/; rerunning a finished stage does nothing."""
    done = (output_dir / FINAL_DIR).is_dir()
    if done and env_rank() == 0:
        log.info("Found %s; the stage is complete, so nothing ran", output_dir / FINAL_DIR)
    return done


def run_stage(
    inputs: StageInputs[Any], prepare: Callable[[DistContext], Trainable], what: str
) -> None:
    """Train, then write `<output_dir>/final`. Collective: run on every rank.

    `prepare` loads, tokenizes and shards; it runs before the first write under output_dir, so
    a failure there leaves nothing half-written.
    """
    hp, out = inputs.config.hyperparameters, inputs.output_dir
    if finished(out):
        return
    torch.manual_seed(hp.seed)  # the same initial weights (e.g. a new head) on every rank
    ctx = init_distributed(hp.bf16)
    try:
        trainable = prepare(ctx)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        log.info(
            "Training %d steps on %d %s (%d held out), %d per rank per micro-step",
            inputs.total_steps,
            len(inputs.train_rows),
            what,
            len(inputs.eval_rows),
            inputs.micro_batch,
        )
        train_loop(inputs, ctx, trainable)
        save_final(
            trainable.model,
            trainable.tokenizer,
            out,
            ctx,
            trainable.dtype,
            FINAL_DIR,
            trainable.export,
        )
    finally:
        close_distributed()
