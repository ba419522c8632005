"""What the online stages (ppo, grpo) share: the step loop around an `Algorithm`.

Per step: rank 0 sends the step's prompts to the rollout servers as one concurrent batch
(`RolloutFeed`; with `async: true` the next step's batch is generated while this one trains)
and broadcasts the samples; every rank optimises on its share (`Algorithm.train`); the new
policy weights go to the servers and the parity probe checks them (`Syncer`); progress,
metrics, checkpoints (models, optimizers, schedulers, RNG, prompt position and the algorithm's
state such as reward moments and the KL controller) and resume work as in the offline stages
(`loop.py`, `checkpoint.py`, `progress.py`). Held-out prompts (dataset.evalFraction), answered
greedily by the servers, give `eval_reward_mean` at the start, at every checkpoint and at the
end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn

from rlhf_trainer.data.batching import DataStream, prompt_token_ids
from rlhf_trainer.data.inputs import FINAL_DIR, StageInputs
from rlhf_trainer.data.readers import PromptRow
from rlhf_trainer.models.causal_lm import save_final
from rlhf_trainer.online.feed import RolloutFeed, StepRollouts
from rlhf_trainer.online.setup import OnlineSetup, prepare
from rlhf_trainer.rollout.client import Sample, Sampling
from rlhf_trainer.runtime import checkpoint
from rlhf_trainer.runtime.distributed import (
    DistContext,
    broadcast_object,
    close_distributed,
    init_distributed,
)
from rlhf_trainer.runtime.progress import ProgressReporter, read_metrics
from rlhf_trainer.training.loop import finished

log = logging.getLogger(__name__)

EVAL_PROMPTS = 64  # held-out prompts answered greedily for eval_reward_mean


class Algorithm(Protocol):
    """One online RL algorithm: how it samples and how it learns from a step's rollouts."""

    sampling: Sampling  # n samples per prompt, temperature, top_p, max_tokens (seed set per step)
    prompts_per_step: int

    def modules(self) -> nn.Module:
        """Every trained model (a ModuleDict when several), for checkpoints."""
        ...

    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    def train(self, step: int, rollouts: StepRollouts) -> tuple[dict[str, float], bool]:
        """Optimise on the step's rollouts (collective); (metrics, whether the policy moved)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints (schedulers, reward moments, KL controller)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def shard(items: Sequence[Any], ctx: DistContext) -> list[Any]:
    """This rank's contiguous block of a list whose length the world size divides."""
    per = len(items) // ctx.world_size
    return list(items[ctx.rank * per : (ctx.rank + 1) * per])


@torch.no_grad()
def evaluate(setup: OnlineSetup, rows: Sequence[PromptRow], max_tokens: int) -> dict[str, float]:
    """Mean reward of greedy answers to held-out prompts (every rank scores all of them)."""
    if not rows:
        return {}
    rows = list(rows[:EVAL_PROMPTS])
    samples: list[Sample] | None = None
    if setup.ctx.is_main:
        assert setup.client is not None
        prompts = prompt_token_ids(setup.tokenizer, rows, setup.max_prompt)
        greedy = Sampling(n=1, max_tokens=max_tokens, temperature=0.0)
        samples = [group[0] for group in setup.client.generate(prompts, greedy)]
    samples = cast(list[Sample], broadcast_object(samples))
    scores = setup.reward.score(samples, [r.prompt for r in rows])
    lengths = [len(s.response_ids) for s in samples]
    return {
        "eval_reward_mean": float(scores.mean()),
        "eval_response_length": sum(lengths) / len(lengths),
    }


def _resume(setup: OnlineSetup, algo: Algorithm, feed: RolloutFeed) -> int:
    root = setup.inputs.output_dir / "checkpoints"
    latest = None
    if setup.ctx.is_main:
        for partial in checkpoint.remove_partial(root):
            log.warning("Removed incomplete checkpoint %s", partial.name)
        found = checkpoint.latest_checkpoint(root)
        latest = str(found) if found else None
    latest = cast(str | None, broadcast_object(latest))
    if latest is None:
        return 0
    state = checkpoint.load_checkpoint(
        Path(latest), algo.modules(), algo.optimizers(), setup.ctx
    )
    algo.load_state_dict(state["algorithm"])
    feed.seek(state["epoch"], state["index"])
    log.info("Resumed from checkpoint %s at step %d", Path(latest).name, state["step"])
    return int(state["step"])


def _save(setup: OnlineSetup, algo: Algorithm, feed: RolloutFeed, step: int) -> None:
    epoch, index = feed.position()
    state = {"epoch": epoch, "index": index, "algorithm": algo.state_dict()}
    hp = setup.inputs.config.hyperparameters
    checkpoint.save_checkpoint(
        setup.inputs.output_dir / "checkpoints",
        step,
        algo.modules(),
        algo.optimizers(),
        state,
        setup.ctx,
        hp.keep_checkpoints,
    )


def _log(
    reporter: ProgressReporter, step: int, total: int, epoch: float, m: dict[str, float]
) -> None:
    reporter.log(step, epoch, m)
    keys = ("reward_mean", "kl", "loss", "policy_loss", "value_loss", "clip_fraction")
    shown = ", ".join(f"{k.replace('_', ' ')} {m[k]:.4g}" for k in keys if k in m)
    log.info("Step %d/%d: %s", step, total, shown)


def online_loop(setup: OnlineSetup, algo: Algorithm) -> None:
    """Steps from the last checkpoint (or 0) to the stage's total. Collective."""
    inputs, ctx = setup.inputs, setup.ctx
    hp, total = inputs.config.hyperparameters, inputs.total_steps
    stream = DataStream(len(inputs.train_rows), hp.seed, shuffle=hp.shuffle)
    feed = RolloutFeed(setup, stream, algo.sampling, algo.prompts_per_step)
    step = _resume(setup, algo, feed)
    reporter = ProgressReporter(inputs.output_dir, total, ctx.is_main)
    reporter.truncate_after(step)
    setup.syncer.sync(setup.actor, step)  # a resumed policy is newer than what servers loaded
    max_tokens = algo.sampling.max_tokens
    if step == 0 and inputs.eval_rows:
        start = evaluate(setup, inputs.eval_rows, max_tokens)
        reporter.log(0, 0.0, start)
        log.info("Before training: %s", start)
    try:
        while step < total:
            rollouts = feed.next(step, prefetch=step + 1 < total)
            started = time.perf_counter()
            metrics, moved = algo.train(step, rollouts)
            metrics["train_s"] = time.perf_counter() - started
            tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in rollouts.samples)
            metrics["train_tokens_per_s"] = tokens / max(metrics["train_s"], 1e-9)
            step += 1
            feed.settle()  # no generation may be in flight while weights change
            if moved:
                metrics |= setup.syncer.sync(setup.actor, step)
            save = step % hp.save_every == 0 and step < total
            if (save or step == total) and inputs.eval_rows:
                metrics |= evaluate(setup, inputs.eval_rows, max_tokens)
            if step % hp.log_every == 0 or step == total or save:
                metrics |= setup.reward_metrics()  # collective with the judge; same on all ranks
                # The algorithm's own say wins: it may have sampled more (dynamic sampling).
                _log(reporter, step, total, feed.epochs_done(), rollouts.metrics | metrics)
            if save:
                _save(setup, algo, feed, step)
    finally:
        feed.close()
    if not read_metrics(reporter.metrics_path) and ctx.is_main:
        reporter.write_progress(total, feed.epochs_done(), {})


def run_online(
    inputs: StageInputs[PromptRow],
    build: Callable[[OnlineSetup], Algorithm],
    samples_per_prompt: int,
) -> None:
    """Train, then write `<output_dir>/final` (the policy). Collective: run on every rank."""
    hp, out = inputs.config.hyperparameters, inputs.output_dir
    if finished(out):
        return
    torch.manual_seed(hp.seed)
    ctx = init_distributed(hp.bf16)
    setup: OnlineSetup | None = None
    try:
        setup = prepare(inputs, ctx)
        algo = build(setup)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
        log.info(
            "Training %d steps on %d prompts (%d held out), %d prompts x %d samples per step",
            inputs.total_steps,
            len(inputs.train_rows),
            len(inputs.eval_rows),
            algo.prompts_per_step,
            samples_per_prompt,
        )
        online_loop(setup, algo)
        save_final(
            setup.actor, setup.tokenizer, out, ctx, setup.dtype, FINAL_DIR, setup.export
        )
    finally:
        if setup is not None:
            setup.close()
        close_distributed()
