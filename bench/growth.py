"""How a GRPO step's cost grows, ours against TRL's: step time against the batch (prompts per
step) and against the response length (max new tokens, 1x, 2x, 4x), on SmolLM2-135M-Instruct.

    python bench/growth.py [--steps 3] [--warmup 1] [--prompts 1 2 4] [--lengths 16 32 64]
                           [--generations 4] [--model smollm2] [--doc FILE] [--plot FILE]

Each point is one run of each side (ours: `engine: trainer`, the CPU default; TRL:
`GRPOTrainer`, HF `generate`), the same settings bench/online.py matches, and its figure the
median of the counted steps' wall times (steps after `--warmup`). The batch sweep holds the
length at its middle value and the length sweep the batch at its middle value, so that point is
run once and shared. Writes the `bench:growth` section of docs/BENCHMARKS.md and a PNG with one
panel per sweep (docs/growth.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from benchlib import (
    DOC,
    ROOT,
    build_models,
    environment,
    load_note,
    median,
    run_json,
    table,
    write_section,
)
from online import TASK_OF, run_ours
from online_common import Setup

BENCH = Path(__file__).resolve().parent
PLOT = ROOT / "docs" / "growth.png"


def step_time(side: str, setup: Setup, model: Path, root: Path, args: argparse.Namespace) -> float:
    """Median wall time of the counted steps of one run of `side` (ours or trl)."""
    workdir = root / f"{side}-{setup.prompts}-{setup.max_new_tokens}"
    if side == "ours":
        result = run_ours("grpo", setup, model, "trainer", "", workdir, args)
    else:
        argv = [sys.executable, str(BENCH / "trl_online.py"), "trl-grpo", "--model", str(model),
                "--workdir", str(workdir), "--setup", json.dumps(asdict(setup))]  # fmt: skip
        result = run_json(argv)
    seconds = median(result["seconds"][args.warmup :])
    print(f"  {side} {setup.prompts} prompts x {setup.generations}, {setup.max_new_tokens} "
          f"tokens: {seconds:.2f} s/step", file=sys.stderr, flush=True)  # fmt: skip
    return seconds


def middle(values: list[int]) -> int:
    return values[len(values) // 2]


Found = dict[tuple[int, int], dict[str, float]]  # (prompts, max new tokens) -> {side: s/step}


def sweep(args: argparse.Namespace, model: Path, root: Path) -> Found:
    """Both sides at each point of the two sweeps."""
    base = Setup(steps=args.steps, prompts=0, generations=args.generations, ppo_prompts=1,
                 max_new_tokens=0, lr=1e-5, ppo_kl=0.05, task=TASK_OF[args.model])  # fmt: skip
    mid_prompts, mid_length = middle(args.prompts), middle(args.lengths)
    points = [(p, mid_length) for p in args.prompts] + [(mid_prompts, n) for n in args.lengths]
    out: Found = {}
    for prompts, length in dict.fromkeys(points):
        setup = dataclasses.replace(base, prompts=prompts, max_new_tokens=length)
        out[prompts, length] = {side: step_time(side, setup, model, root, args)
                                for side in ("ours", "trl")}  # fmt: skip
    return out


def plot(found: Found, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mid_prompts, mid_length = middle(args.prompts), middle(args.lengths)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for side, label in (("ours", "ours, engine: trainer"), ("trl", "TRL GRPOTrainer")):
        left.plot(
            [p * args.generations for p in args.prompts],
            [found[p, mid_length][side] for p in args.prompts],
            marker="o",
            label=label,
        )
        right.plot(args.lengths, [found[mid_prompts, n][side] for n in args.lengths], marker="o",
                   label=label)  # fmt: skip
    left.set(xlabel=f"samples per step ({args.generations} per prompt), {mid_length} new tokens",
             ylabel="seconds per step")  # fmt: skip
    right.set(xlabel=f"max new tokens, {mid_prompts * args.generations} samples per step")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("GRPO step time on SmolLM2-135M-Instruct (CPU, float32)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--model", choices=sorted(TASK_OF), default="smollm2")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    args.nproc, args.threads = 1, 0  # what online.run_ours reads
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rlhf-growth-") as tmp:
        model = build_models(Path(tmp), [args.model])[args.model]
        found = sweep(args, model, Path(tmp))
    plot(found, args, args.plot)
    rows = [[p * args.generations, n, v["ours"], v["trl"], f"{v['trl'] / v['ours']:.2f}x"]
            for (p, n), v in found.items()]  # fmt: skip
    command = (f"python bench/growth.py --steps {args.steps} --warmup {args.warmup} --prompts "
               f"{' '.join(map(str, args.prompts))} --lengths {' '.join(map(str, args.lengths))} "
               f"--generations {args.generations} --model {args.model}")  # fmt: skip
    body = "\n".join([
        f"Machine: {environment()}. {load_note(load)}.",
        "",
        f"GRPO on {args.model}, float32, 1 process each: ours with `engine: trainer` against "
        f"TRL `GRPOTrainer` (HF `generate`), the settings bench/online.py matches. Each point is "
        f"one run of {args.steps} steps per side, its figure the median wall time of the steps "
        f"after the first {args.warmup}. Responses stop at EOS, so a longer limit is not always "
        "a longer response.",
        "",
        f"Command: `{command}`",
        "",
        table(["samples per step", "max new tokens", "ours s/step", "TRL s/step",
               "TRL / ours"], rows),
        "",
        f"![GRPO step time against batch and response length]({args.plot.name})",
    ])  # fmt: skip
    write_section("growth", "How a GRPO step's cost grows: batch and response length", body,
                  args.doc)  # fmt: skip
    print(body)


if __name__ == "__main__":
    main()
