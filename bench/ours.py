"""Run one of our offline stages (sft or dpo) and print each optimizer step's wall time.

    python bench/ours.py {sft,dpo} --model DIR --workdir DIR --steps N --batch B --max-length L
                         [--data plain|chat]
    torchrun --nproc-per-node 2 bench/ours.py ...     (the same, sharded over 2 ranks)

It runs the trainer's own entry (`preflight.check_*`, then `run_sft` / `run_dpo`), with
`log_every: 1` and no checkpoint before the end, and times each step as the trainer's own
`tokens_per_s` does: from the end of the previous step's log to this step's log
(`loop.log_step` is wrapped to read the clock, nothing else changes). Prints one JSON line on
rank 0: {"seconds": [per step], "tokens": [non-pad tokens per step], "trained_tokens": [SFT:
the response tokens scored per step, the positions its output layer runs at; DPO: 0]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import FIXTURES
from rlhf_trainer import preflight
from rlhf_trainer.config import (
    WORKSPACE_ENV,
    DatasetSpec,
    DPOOptions,
    Hyperparameters,
    ModelSource,
    StageConfig,
)
from rlhf_trainer.runtime.launch_env import env_rank, env_world_size
from rlhf_trainer.training import loop

# (stage, data) -> (file, format): `plain` is the tiny models' prompt/response text, `chat` the
# conversational rows a real instruct model trains on (tasks/brief.py, SmolLM2's own answers).
DATA: dict[tuple[str, str], tuple[Path, Any]] = {
    ("sft", "plain"): (FIXTURES / "sft.jsonl", "jsonl"),
    ("dpo", "plain"): (FIXTURES / "preference.jsonl", "preference"),
    ("sft", "chat"): (FIXTURES / "brief" / "brief_sft.jsonl", "chat"),
    ("dpo", "chat"): (FIXTURES / "brief" / "brief_pairs.jsonl", "chat"),
}


def stage_config(args: argparse.Namespace) -> StageConfig:
    """The same hyperparameters bench/trl_peer.py gives TRL."""
    hp = Hyperparameters(
        max_steps=args.steps, batch_size=args.batch, max_length=args.max_length,
        learning_rate=args.lr, lr_scheduler="cosine", warmup_steps=0, weight_decay=0.0,
        grad_clip=1.0, save_every=10**6, log_every=1, seed=args.seed, bf16=args.bf16,
    )  # fmt: skip
    dpo = DPOOptions(beta=args.beta, loss_type="sigmoid") if args.stage == "dpo" else None
    path, fmt = DATA[args.stage, args.data]
    return StageConfig(
        run="bench", stage=args.stage, type=args.stage,
        model=ModelSource(path=str(Path(args.model).resolve())),
        dataset=DatasetSpec(path=str(path), format=fmt),
        output_dir="out",
        hyperparameters=hp, dpo=dpo,
    )  # fmt: skip


@contextlib.contextmanager
def profiled(out: Path | None) -> Iterator[None]:
    """With `out`, torch's profiler over the whole stage; its ops by self CPU time go there."""
    if out is None:
        yield
        return
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield
    out.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["dpo", "sft"])
    parser.add_argument("--data", choices=["plain", "chat"], default="plain")
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", required=True, help="the workspace; out/ is written in it")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--profile", type=Path, help="write torch's profile of the stage here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ[WORKSPACE_ENV] = str(Path(args.workdir).resolve())

    seconds: list[float] = []
    tokens: list[float] = []
    trained: list[float] = []  # SFT: the response tokens scored (the output layer's rows)
    original = loop.log_step

    def timed_log_step(reporter: Any, step: int, total: int, epoch: float,
                       window: loop.Window, extra: dict[str, float]) -> None:  # fmt: skip
        seconds.append(time.perf_counter() - window.started)
        tokens.append(window.tokens)
        trained.append(window.metrics.get("trained_tokens", 0.0) / max(window.steps, 1))
        original(reporter, step, total, epoch, window, extra)

    loop.log_step = timed_log_step
    config = stage_config(args)
    with profiled(args.profile):
        if args.stage == "sft":
            from rlhf_trainer.offline.sft import run_sft

            run_sft(preflight.check_sft(config, env_world_size()))
        else:
            from rlhf_trainer.offline.dpo import run_dpo

            run_dpo(preflight.check_dpo(config, env_world_size()))
    if env_rank() == 0:
        print(json.dumps({"seconds": seconds, "tokens": tokens, "trained_tokens": trained}))


if __name__ == "__main__":
    main()
