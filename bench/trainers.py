"""Offline trainers against TRL: DPO pairs/s against `DPOTrainer`, SFT tokens/s against
`SFTTrainer`, on the test-size tiny model and the ~20M-parameter preset.

    python bench/trainers.py [--repeats 3] [--steps 12] [--warmup 2] [--stages dpo sft]

Each repeat is a fresh process (bench/ours.py or bench/trl_peer.py) on the same model, data,
batch, max length and number of optimizer steps; ours and TRL's alternate. A repeat's
throughput is the work per step after `--warmup` over the median step time; the table gives
the median over repeats and ours / TRL. Writes its sections of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    DOC,
    environment,
    interleave,
    load_note,
    median,
    ratio,
    run_json,
    table,
    write_section,
)

BENCH = Path(__file__).resolve().parent
MODELS = {"tiny": "tiny (0.46M)", "20m": "20m (19.8M)"}
UNITS = {"dpo": "pairs/s", "sft": "tokens/s"}
RAW: dict[str, list[Any]] = {}  # "script stage model" -> each repeat's per-step output


def build_models(root: Path, presets: list[str]) -> dict[str, Path]:
    out = {}
    for preset in presets:
        path = root / f"model-{preset}"
        argv = [sys.executable, "-m", "rlhf_trainer", "tiny-model", str(path), "--preset", preset]
        subprocess.run(argv, check=True, capture_output=True)
        out[preset] = path
    return out


def throughput(result: dict[str, list[float]], stage: str, batch: int, warmup: int) -> float:
    """Work per step (pairs, or non-pad tokens averaged over the counted steps) over the median
    step time: a step slowed by a burst of load from elsewhere moves a median, not a sum."""
    seconds = result["seconds"][warmup:]
    per_step = batch if stage == "dpo" else sum(result["tokens"][warmup:]) / len(seconds)
    return per_step / median(seconds)


def runner(
    script: str, stage: str, model: Path, root: Path, args: argparse.Namespace, code: str = ""
) -> Callable[[], float]:
    """One repeat per call; `code`: a folder holding another `rlhf_trainer` to run instead."""
    count = iter(range(10**6))
    raw: list[Any] = RAW.setdefault(f"{script}{code and ' before'} {stage} {model.name}", [])

    def run() -> float:
        workdir = root / f"{script}-{stage}-{model.name}-{len(code)}-{next(count)}"
        argv = [sys.executable, str(BENCH / script), stage, "--model", str(model),
                "--workdir", str(workdir), "--steps", str(args.steps), "--batch", str(args.batch),
                "--max-length", str(args.max_length)]  # fmt: skip
        result = run_json(argv, {"PYTHONPATH": code} if code else None)
        raw.append(result)
        return throughput(result, stage, args.batch, args.warmup)

    return run


def section(
    stage: str, args: argparse.Namespace, results: dict[str, dict[str, list[float]]], load: float
) -> str:
    unit = UNITS[stage]
    rows = []
    for preset, label in MODELS.items():
        if preset not in results:
            continue
        ours, peer = median(results[preset]["ours"]), median(results[preset]["trl"])
        runs = ", ".join(f"{v:.0f}" for v in results[preset]["ours"])
        peer_runs = ", ".join(f"{v:.0f}" for v in results[preset]["trl"])
        row: list[object] = [label, ours, peer, ratio(ours, peer), f"{runs} / {peer_runs}"]
        if "ours before" in results[preset]:
            before = median(results[preset]["ours before"])
            row[3:3] = [before, ratio(before, peer)]
        rows.append(row)
    peer_name = "DPOTrainer" if stage == "dpo" else "SFTTrainer (completion-only loss)"
    data = "preference" if stage == "dpo" else "sft"
    header = ["model", f"ours {unit}", f"TRL {unit}", "ours / TRL", "each repeat, ours / TRL"]
    if rows and len(rows[0]) > len(header):
        header[3:3] = [f"ours before {unit}", "before / TRL"]
    common = f"--steps {args.steps} --batch {args.batch} --max-length {args.max_length}"
    return "\n".join(
        [
            f"Machine: {environment()}. {load_note(load)}; ours and TRL's repeats were "
            "interleaved to spread any load from elsewhere over both alike.",
            "",
            f"Ours (`bench/ours.py {stage}`, our trainer's own entry point, 1 process) against TRL "
            f"`{peer_name}` (`bench/trl_peer.py {stage}`, 1 process), float32 on CPU, data "
            f"`tests/fixtures/{data}.jsonl`, batch {args.batch}, "
            f"max length {args.max_length}, {args.steps} optimizer steps of which the first "
            f"{args.warmup} are warm-up and not counted. A repeat's figure is its work per step "
            f"over its median step time; the table gives the median of {args.repeats} repeats.",
            "",
            f"Command: `{shlex.join(['python', 'bench/trainers.py', '--stages', stage])} "
            f"--repeats {args.repeats} {common} --warmup {args.warmup}`",
            "",
            table(header, rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--stages", nargs="+", choices=sorted(UNITS), default=["dpo", "sft"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--before",
        default="",
        help="a folder with an earlier copy of rlhf_trainer/, run as a third arm (before/after)",
    )
    parser.add_argument("--raw", type=Path, help="also write every step's time here (JSON)")
    parser.add_argument("--doc", type=Path, default=DOC, help="where the sections are written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as tmp:
        models = build_models(Path(tmp), args.models)
        for stage in args.stages:
            results = {}
            load = os.getloadavg()[0]
            for preset in args.models:
                print(f"{stage} on {preset}:", file=sys.stderr, flush=True)
                runs = {
                    name: runner(script, stage, models[preset], Path(tmp), args)
                    for name, script in (("ours", "ours.py"), ("trl", "trl_peer.py"))
                }
                if args.before:
                    before = runner("ours.py", stage, models[preset], Path(tmp), args, args.before)
                    runs["ours before"] = before
                results[preset] = interleave(runs, args.repeats)
            title = ("DPO: pairs/s against TRL DPOTrainer" if stage == "dpo"
                     else "SFT: tokens/s against TRL SFTTrainer")  # fmt: skip
            body = section(stage, args, results, load)
            write_section(stage, title, body, args.doc)
            print(body)
    if args.raw:
        args.raw.write_text(json.dumps(RAW, indent=1))


if __name__ == "__main__":
    main()
