"""`python -m rlhf_trainer eval`: compare policies on held-out prompts (what `rlhf eval` runs).

    python -m rlhf_trainer eval --policy sft=runs/r/sft/final --policy dpo=runs/r/dpo/final \\
        --reward-model runs/r/rm/final --prompts data/prompts.jsonl \\
        --reference-data data/sft_eval.jsonl --kl-reference sft

Prints the report as JSON on stdout and a comparison table on stderr. Torch-free until the
inputs are checked, like the stage entry points.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rlhf_trainer.config import DatasetSpec, ModelSource
from rlhf_trainer.data.inputs import EvalInputs, Loader
from rlhf_trainer.data.readers import (
    Row,
    dataset_chat,
    load_preference_rows,
    load_prompt_rows,
    load_sft_rows,
)
from rlhf_trainer.errors import UserError
from rlhf_trainer.preflight import check_model_source
from rlhf_trainer.rewards.functions import resolve_reward_function
from rlhf_trainer.tasks import animal_sounds as tasks


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="compare policies: reward-model score, perplexity, KL; reward-model accuracy",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a policy to evaluate (repeat); PATH is a model folder or hub id",
    )
    p.add_argument("--prompts", help="held-out prompts (JSONL with a prompt field)")
    p.add_argument("--prompts-format", default="prompts", help="dataset format of --prompts")
    p.add_argument("--reward-model", help="reward model folder that scores the responses")
    p.add_argument(
        "--reward-function",
        help=f"reward function: a registered one ({_functions()}) or module:callable on the "
        "trainer's allow-list ($RLHF_REWARD_FUNCTION_MODULES)",
    )
    p.add_argument("--kl-reference", help="reference policy for KL: a --policy NAME or a PATH")
    p.add_argument("--reference-data", help="supervised JSONL for perplexity")
    p.add_argument("--reference-format", default="jsonl", help="dataset format of it")
    p.add_argument("--pairs", help="held-out preference pairs for reward-model accuracy")
    p.add_argument("--pairs-format", default="preference", help="dataset format of --pairs")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=512)


def _functions() -> str:
    return ", ".join(sorted(tasks.REWARD_FUNCTIONS))


def _dataset(path: str, fmt: str, flag: str) -> DatasetSpec:
    try:
        return DatasetSpec.model_validate({"path": path, "format": fmt})
    except ValueError as err:
        raise UserError(f"{flag}: {err}".splitlines()[0]) from None


def eval_inputs(args: argparse.Namespace) -> EvalInputs:
    """Check every flag, model folder and data row; raise UserError naming the flag."""
    policies: dict[str, str] = {}
    for item in args.policy:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--policy: expected NAME=PATH, got {item!r}")
        policies[name] = check_model_source(ModelSource(path=path))
    if not policies and not args.pairs:
        raise UserError("--policy: give at least one policy (or --pairs for a reward model)")
    if policies and not args.prompts:
        raise UserError("--prompts: policies are evaluated on held-out prompts; give a JSONL file")
    if args.reward_function:
        try:
            resolve_reward_function(args.reward_function)
        except UserError as err:
            raise UserError(str(err).replace("reward.function:", "--reward-function:", 1)) from None
    if args.pairs and not args.reward_model:
        raise UserError("--pairs: pairwise accuracy is of a reward model; give --reward-model")
    reference = args.kl_reference
    if reference is not None and reference not in policies:
        reference = check_model_source(ModelSource(path=reference))
    elif reference is not None:
        reference = policies[reference]
    # Chat data is rendered with the first policy's template (the policies of a run share it).
    model = ModelSource(path=next(iter(policies.values()))) if policies else None

    def rows(spec: DatasetSpec, load: Loader[Row]) -> list[Row]:
        return load(spec, dataset_chat(spec, model) if model else None)

    return EvalInputs(
        policies=policies,
        prompts=rows(_dataset(args.prompts, args.prompts_format, "--prompts"), load_prompt_rows)
        if args.prompts
        else [],
        reference_model=reference,
        reward_model=check_model_source(ModelSource(path=args.reward_model))
        if args.reward_model
        else None,
        reward_function=args.reward_function,
        reference_rows=rows(
            _dataset(args.reference_data, args.reference_format, "--reference-data"),
            load_sft_rows,
        )
        if args.reference_data
        else [],
        pairs=rows(_dataset(args.pairs, args.pairs_format, "--pairs"), load_preference_rows)
        if args.pairs
        else [],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )


def run_eval_command(args: argparse.Namespace) -> None:
    inputs = eval_inputs(args)
    from rlhf_trainer.evaluate.stage import comparison_table, evaluate_policies

    report = evaluate_policies(inputs)
    if report is not None:  # rank 0
        print(comparison_table(report), file=sys.stderr, flush=True)
        print(json.dumps(report, indent=2), flush=True)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag on error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value
