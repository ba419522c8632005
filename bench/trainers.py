"""Offline trainers against TRL: DPO pairs/s against `DPOTrainer`, SFT tokens/s against
`SFTTrainer`, on SmolLM2-135M-Instruct with chat data (the headline), the test-size tiny model
and the ~20M-parameter preset (prompt/response text).

    python bench/trainers.py [--repeats 3] [--steps 12] [--warmup 2] [--stages dpo sft]
                             [--models smollm2 tiny 20m] [--precision float32|bf16]

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
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    DOC,
    MODELS,
    ROOT,
    build_models,
    environment,
    figure,
    interleave,
    load_note,
    median,
    ratio,
    run_json,
    table,
    write_section,
)
from ours import DATA as FILES
from rlhf_trainer.config import CPU_BF16_ENV

BENCH = Path(__file__).resolve().parent
# The data each model trains on: the real instruct model on conversational rows.
DATA = {"smollm2": "chat", "tiny": "plain", "20m": "plain"}
UNITS = {"dpo": "pairs/s", "sft": "tokens/s"}
CHAT = (" (chat rows through the model's chat template on both sides; TRL's SFT gets them as "
        "conversational prompt/completion)")  # fmt: skip
PRECISION = {
    "float32": "float32",
    "bf16": "bf16 mixed precision (ours `bf16: true` with `RLHF_CPU_BF16=force`, so no float32 "
    "fallback; TRL `bf16=True`, accelerate's CPU autocast)",
}
RAW: dict[str, list[Any]] = {}  # "script stage model" -> each repeat's per-step output


def throughput(result: dict[str, list[float]], stage: str, batch: int, warmup: int) -> float:
    """Work per step (pairs, or non-pad tokens averaged over the counted steps) over the median
    step time: a step slowed by a burst of load from elsewhere moves a median, not a sum."""
    seconds = result["seconds"][warmup:]
    per_step = batch if stage == "dpo" else sum(result["tokens"][warmup:]) / len(seconds)
    return per_step / median(seconds)


def runner(script: str, stage: str, preset: str, model: Path, root: Path,
           args: argparse.Namespace, code: str = "") -> Callable[[], float]:  # fmt: skip
    """One repeat per call; `code`: a folder holding another `rlhf_trainer` to run instead."""
    count = iter(range(10**6))
    raw: list[Any] = RAW.setdefault(f"{script}{code and ' before'} {stage} {preset}", [])

    def run() -> float:
        workdir = root / f"{script}-{stage}-{preset}-{len(code)}-{next(count)}"
        argv = [sys.executable, str(BENCH / script), stage, "--model", str(model),
                "--workdir", str(workdir), "--steps", str(args.steps), "--batch", str(args.batch),
                "--max-length", str(args.max_length), "--data", DATA[preset]]  # fmt: skip
        env = {"PYTHONPATH": code} if code else {}
        if args.precision == "bf16":  # asked for on both sides: no float32 fallback on AVX2
            argv.append("--bf16")
            env[CPU_BF16_ENV] = "force"
        result = run_json(argv, env)
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
        runs = ", ".join(figure(v) for v in results[preset]["ours"])
        peer_runs = ", ".join(figure(v) for v in results[preset]["trl"])
        row: list[object] = [label, ours, peer, ratio(ours, peer), f"{runs} / {peer_runs}"]
        if "ours before" in results[preset]:
            before = median(results[preset]["ours before"])
            row[3:3] = [before, ratio(before, peer)]
        rows.append(row)
    peer_name = "DPOTrainer" if stage == "dpo" else "SFTTrainer (completion-only loss)"
    data = "; ".join(f"{MODELS[p]} on `{FILES[stage, DATA[p]][0].relative_to(ROOT)}`"
                     + (CHAT if DATA[p] == "chat" else "") for p in results)  # fmt: skip
    precision = PRECISION[args.precision]
    header = ["model", f"ours {unit}", f"TRL {unit}", "ours / TRL", "each repeat, ours / TRL"]
    if rows and len(rows[0]) > len(header):
        header[3:3] = [f"ours before {unit}", "before / TRL"]
    common = (f"--models {' '.join(results)} --steps {args.steps} --batch {args.batch} "
              f"--max-length {args.max_length} --precision {args.precision}")  # fmt: skip
    return "\n".join(
        [
            f"Machine: {environment()}. {load_note(load)}; ours and TRL's repeats were "
            "interleaved to spread any load from elsewhere over both alike.",
            "",
            f"Ours (`bench/ours.py {stage}`, our trainer's own entry point, 1 process) against TRL "
            f"`{peer_name}` (`bench/trl_peer.py {stage}`, 1 process), {precision} on CPU, data: "
            f"{data}, batch {args.batch}, "
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
    parser.add_argument("--precision", choices=sorted(PRECISION), default="float32")
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
                model = models[preset]
                runs = {
                    name: runner(script, stage, preset, model, Path(tmp), args)
                    for name, script in (("ours", "ours.py"), ("trl", "trl_peer.py"))
                }
                if args.before:
                    runs["ours before"] = runner("ours.py", stage, preset, model, Path(tmp), args,
                                                 args.before)  # fmt: skip
                results[preset] = interleave(runs, args.repeats)
            title = ("DPO: pairs/s against TRL DPOTrainer" if stage == "dpo"
                     else "SFT: tokens/s against TRL SFTTrainer")  # fmt: skip
            body = section(stage, args, results, load)
            if args.precision == "bf16":
                stage, title = f"{stage}-bf16", f"{title}, bf16"
            write_section(stage, title, body, args.doc)
            print(body)
    if args.raw:
        args.raw.write_text(json.dumps(RAW, indent=1))


if __name__ == "__main__":
    main()
