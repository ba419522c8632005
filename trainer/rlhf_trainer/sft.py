"""Supervised fine-tuning with FSDP2: cross-entropy on response tokens only.

One optimizer step consumes `batchSize` examples over all ranks: `gradientAccumulation`
micro-steps of `batchSize / (worldSize * gradientAccumulation)` examples per rank. The loss is
summed over response tokens and divided by the response-token count of the whole global batch, so
the gradient does not depend on how the batch is split (see `losses.sft_loss_sum`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR

from rlhf_trainer import checkpoint
from rlhf_trainer.batching import DataStream, Example, collate, rank_micro_batches, tokenize_sft
from rlhf_trainer.config import Hyperparameters
from rlhf_trainer.distributed import (
    DistContext,
    all_reduce_sum,
    broadcast_object,
    close_distributed,
    init_distributed,
    shard_model,
)
from rlhf_trainer.launch_env import env_rank
from rlhf_trainer.losses import IGNORE_INDEX, count_targets, sft_loss_sum
from rlhf_trainer.model import load_causal_lm, load_tokenizer, save_final
from rlhf_trainer.preflight import FINAL_DIR, SFTInputs
from rlhf_trainer.progress import ProgressReporter, read_metrics
from rlhf_trainer.schedule import lr_factor

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    tokens: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, tokens: float) -> None:
        self.steps, self.loss, self.tokens = self.steps + 1, self.loss + loss, self.tokens + tokens


def n_targets(example: Example) -> int:
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def build_optimizer(
    model: nn.Module, hp: Hyperparameters, total: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW with weight decay on matrices only (not norms or biases), and the LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=hp.adam_betas)
    factor = functools.partial(
        lr_factor, warmup_steps=hp.warmup_steps, total_steps=total, kind=hp.lr_scheduler
    )
    return optimizer, LambdaLR(optimizer, factor)


def train_step(
    model: nn.Module,
    examples: list[Example],
    batch: list[int],
    ctx: DistContext,
    grad_accum: int,
    pad_id: int,
) -> tuple[float, float]:
    """Forward/backward of one global batch on this rank's slices; returns the global mean loss
    and the number of (non-pad) tokens processed by all ranks."""
    global_targets = max(1, sum(n_targets(examples[i]) for i in batch))
    fsdp = cast(FSDPModule, model)
    loss_sum, tokens = 0.0, 0.0
    micro_batches = rank_micro_batches(batch, ctx.world_size, ctx.rank, grad_accum)
    for m, indices in enumerate(micro_batches):
        fsdp.set_requires_gradient_sync(m == len(micro_batches) - 1)
        tensors = {
            k: v.to(ctx.device) for k, v in collate([examples[i] for i in indices], pad_id).items()
        }
        logits = model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).logits
        micro_loss = sft_loss_sum(logits, tensors["labels"])
        # FSDP averages gradients over ranks; scaling by world size turns that into a sum.
        scaled: torch.Tensor = micro_loss * (ctx.world_size / global_targets)
        scaled.backward()  # type: ignore[no-untyped-call]
        loss_sum += float(micro_loss.detach())
        tokens += float(tensors["attention_mask"].sum())
    total_loss, total_tokens = all_reduce_sum([loss_sum, tokens], ctx.device)
    return total_loss / global_targets, total_tokens


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[Example], ctx: DistContext, micro: int, pad_id: int
) -> float:
    """Mean response-token loss over `examples`. Every rank runs the same number of forwards
    (FSDP gathers weights collectively); ranks past the end score a fully masked dummy."""
    model.eval()
    dummy = Example([pad_id, pad_id], [IGNORE_INDEX, IGNORE_INDEX])
    per_round = ctx.world_size * micro
    loss_sum, targets = 0.0, 0.0
    for start in range(0, len(examples), per_round):
        mine = [start + ctx.rank * micro + j for j in range(micro)]
        batch = [examples[i] if i < len(examples) else dummy for i in mine]
        tensors = {k: v.to(ctx.device) for k, v in collate(batch, pad_id).items()}
        logits = model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).logits
        loss_sum += float(sft_loss_sum(logits, tensors["labels"]))
        targets += count_targets(tensors["labels"])
    model.train()
    total, count = all_reduce_sum([loss_sum, targets], ctx.device)
    return total / max(count, 1.0)


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    """Global grad norm over all (DTensor) shards; clips to `max_norm` unless it is 0."""
    limit = max_norm if max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(full)


def resume(
    inputs: SFTInputs,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    ctx: DistContext,
) -> tuple[int, DataStream]:
    """Load the newest complete checkpoint if there is one; return (step, data stream)."""
    root = inputs.output_dir / "checkpoints"
    seed = inputs.config.hyperparameters.seed
    latest = None
    if ctx.is_main:
        for partial in checkpoint.remove_partial(root):
            log.warning("Removed incomplete checkpoint %s", partial.name)
        found = checkpoint.latest_checkpoint(root)
        latest = str(found) if found else None
    latest = cast(str | None, broadcast_object(latest))
    if latest is None:
        return 0, DataStream(len(inputs.train_rows), seed)
    state = checkpoint.load_checkpoint(Path(latest), model, optimizer, ctx)
    scheduler.load_state_dict(state["scheduler"])
    stream = DataStream(len(inputs.train_rows), seed, state["epoch"], state["index"])
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
    elapsed = max(time.perf_counter() - window.started, 1e-9)
    metrics = {
        "loss": window.loss / max(window.steps, 1),
        "tokens_per_s": window.tokens / elapsed,
        **extra,
    }
    reporter.log(step, epoch, metrics)
    log.info(
        "Step %d/%d: loss %.4f, lr %.2e, grad norm %.3f, %.0f tokens/s%s",
        step,
        total,
        metrics["loss"],
        metrics["learning_rate"],
        metrics["grad_norm"],
        metrics["tokens_per_s"],
        f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "",
    )


def train_loop(
    inputs: SFTInputs,
    ctx: DistContext,
    model: nn.Module,
    examples: list[Example],
    eval_examples: list[Example],
    pad_id: int,
) -> None:
    hp = inputs.config.hyperparameters
    total, out = inputs.total_steps, inputs.output_dir
    optimizer, scheduler = build_optimizer(model, hp, total)
    step, stream = resume(inputs, model, optimizer, scheduler, ctx)
    reporter = ProgressReporter(out, total, ctx.is_main)
    reporter.truncate_after(step)
    window = Window()
    while step < total:
        lr = float(scheduler.get_last_lr()[0])
        loss, tokens = train_step(
            model, examples, stream.next_batch(hp.batch_size), ctx, hp.gradient_accumulation, pad_id
        )
        norm = grad_norm_and_clip(model, hp.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(loss, tokens)
        save = step % hp.save_every == 0 and step < total
        extra = {"learning_rate": lr, "grad_norm": norm}
        if eval_examples and (save or step == total):
            extra["eval_loss"] = evaluate(model, eval_examples, ctx, inputs.micro_batch, pad_id)
        if step % hp.log_every == 0 or step == total or "eval_loss" in extra:
            log_step(reporter, step, total, stream.epochs_done, window, extra)
            window = Window()
        if save:
            state: dict[str, Any] = {"epoch": stream.epoch, "index": stream.index}
            state["scheduler"] = scheduler.state_dict()
            checkpoint.save_checkpoint(
                out / "checkpoints", step, model, optimizer, state, ctx, hp.keep_checkpoints
            )
    if window.steps == 0 and ctx.is_main:  # resumed at the very end: keep the last metrics
        last = read_metrics(reporter.metrics_path)[-1:] or [{}]
        reporter.write_progress(total, stream.epochs_done, last[0])


def run_sft(inputs: SFTInputs) -> None:
    """Train, then write `<output_dir>/final`. Collective: run on every rank."""
    hp = inputs.config.hyperparameters
    out = inputs.output_dir
    if (out / FINAL_DIR).is_dir():
        if env_rank() == 0:
            log.info("Found %s; the stage is complete, so nothing ran", out / FINAL_DIR)
        return
    torch.manual_seed(hp.seed)
    tokenizer = load_tokenizer(inputs.config.model, inputs.model_ref)
    examples = tokenize_sft(inputs.train_rows, tokenizer, hp.max_length)
    eval_examples = (
        tokenize_sft(inputs.eval_rows, tokenizer, hp.max_length) if inputs.eval_rows else []
    )
    model, saved_dtype = load_causal_lm(inputs.config.model, inputs.model_ref)
    ctx = init_distributed(hp.bf16)
    try:
        # Every input has been checked by now; this is the first write under output_dir.
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        log.info(
            "Training %d steps on %d examples (%d held out), %d per rank per micro-step",
            inputs.total_steps,
            len(examples),
            len(eval_examples),
            inputs.micro_batch,
        )
        model.train()
        shard_model(model, ctx.bf16)
        train_loop(inputs, ctx, model, examples, eval_examples, int(tokenizer.pad_token_id))
        save_final(model, tokenizer, out, ctx, saved_dtype, FINAL_DIR)
    finally:
        close_distributed()
