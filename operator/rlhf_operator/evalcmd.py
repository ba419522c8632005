"""`rlhf eval`: compare policies (and a reward model) after a run, on held-out data.

    rlhf eval examples/dpo.yaml --workdir runs --prompts runs/data/prompts.jsonl \\
        --reference-data runs/data/sft_eval.jsonl --reward-function animal_sounds

With a run file, the policies default to the run's first and last policy stages (the SFT and
the final policy), the reward model to its last `reward` stage and the KL reference to the first
policy, all read from `<workdir>/<run>/<stage>/final`. `--policy NAME=PATH` and the other flags
set them explicitly. The operator carries no torch, so the work happens in
`python -m rlhf_trainer eval`, which prints a comparison table on stderr and the report as JSON
on stdout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from rlhf_operator import api


class EvalUsageError(Exception):
    """A problem with the flags or the run's outputs; the message names it."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "eval", help="compare the policies of a run: reward, perplexity, KL; RM accuracy"
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="the RLHFRun whose outputs to compare")
    p.add_argument("--workdir", default="runs", help="the run's work dir (default: runs)")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=PATH|STAGE")
    p.add_argument("--prompts", help="held-out prompts (JSONL with a prompt field)")
    p.add_argument(
        "--prompts-format", default="prompts", help="dataset format of --prompts (chat: messages)"
    )
    p.add_argument("--reward-model", metavar="PATH|STAGE", help="default: the run's reward stage")
    p.add_argument("--reward-function", help="registered reward function, e.g. animal_sounds")
    p.add_argument("--kl-reference", metavar="NAME|PATH", help="default: the first policy")
    p.add_argument("--reference-data", help="supervised JSONL for perplexity")
    p.add_argument("--pairs", help="held-out preference pairs for reward-model accuracy")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=512)
    return p


def _output(workdir: Path, run: api.RLHFRun, stage: str) -> str:
    final = workdir / run.metadata.name / stage / "final"
    if not final.is_dir():
        raise EvalUsageError(
            f"{stage}: no output at {final}; run the pipeline first (`rlhf run FILE --workdir "
            f"{workdir}`)"
        )
    return str(final.resolve())


def from_run(run: api.RLHFRun, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Policies, reward model and KL reference of a finished run, unless flags set them."""
    stages = {s.name: s for s in run.spec.stages}
    policies = [s.name for s in run.spec.stages if s.type in api.POLICY_TYPES]
    chosen: list[str] = []
    for item in args.policy or ([policies[0], policies[-1]] if policies else []):
        name, sep, path = item.partition("=")
        if not sep and name not in stages:
            raise EvalUsageError(f"--policy: {name!r} is not a stage of {run.metadata.name}")
        entry = f"{name}={path if sep else _output(workdir, run, name)}"
        if entry not in chosen:
            chosen.append(entry)
    rewards = [s.name for s in run.spec.stages if s.type == "reward"]
    reward_model = args.reward_model or (rewards[-1] if rewards else None)
    if reward_model in stages:
        reward_model = _output(workdir, run, reward_model)
    reference = args.kl_reference or (chosen[0].partition("=")[0] if chosen else None)
    return {"policy": chosen, "reward_model": reward_model, "kl_reference": reference}


def trainer_argv(args: argparse.Namespace, resolved: dict[str, Any]) -> list[str]:
    """`python -m rlhf_trainer eval ...` with every path made absolute."""
    argv = [sys.executable, "-m", "rlhf_trainer", "eval"]

    def path(value: str) -> str:
        return str(Path(value).resolve())

    for item in resolved["policy"]:
        name, _, where = item.partition("=")
        argv += ["--policy", f"{name}={path(where)}"]
    options = {
        "--prompts": args.prompts and path(args.prompts),
        "--reward-model": resolved["reward_model"] and path(resolved["reward_model"]),
        "--reward-function": args.reward_function,
        "--prompts-format": args.prompts and args.prompts_format,
        "--kl-reference": resolved["kl_reference"],
        "--reference-data": args.reference_data and path(args.reference_data),
        "--pairs": args.pairs and path(args.pairs),
    }
    for flag, value in options.items():
        if value:
            argv += [flag, value]
    for flag in ("max_new_tokens", "batch_size", "max_length"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv


def run_eval(args: argparse.Namespace, run: api.RLHFRun | None) -> int:
    if run is not None:
        resolved = from_run(run, Path(args.workdir), args)
    else:
        resolved = {
            "policy": args.policy,
            "reward_model": args.reward_model,
            "kl_reference": args.kl_reference,
        }
    reference = resolved["kl_reference"]
    names = [p.partition("=")[0] for p in resolved["policy"]]
    if reference is not None and reference not in names and not Path(reference).exists():
        raise EvalUsageError(f"--kl-reference: {reference!r} is neither a policy nor a folder")
    if reference is not None and reference not in names:
        resolved["kl_reference"] = str(Path(reference).resolve())
    return subprocess.call(trainer_argv(args, resolved))


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag on error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value
