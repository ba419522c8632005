"""What a stage would refuse only when it starts, checked when the run is parsed.

Without these, `rlhf validate` passed specs that failed at their stage's start, after every
earlier stage's GPU hours (issue 23): a dataset format the stage's reader refuses, a batch that
does not split over the ranks, an unknown reward function, a `from` that names no policy,
rollout settings the planner refuses. `api.parse_run` (so `rlhf validate`, the admission webhook
and `rlhf run`) runs them once the models validate; each problem is one `spec.field.path: what is
wrong; the fix` line. The trainer checks the same again at stage start (preflight.py, data.py).

`CEL_RULES` and `STAGE_LIST_RULES` say in the CRD what CEL can of these checks and of the
config validators that came with them (crd.py attaches them). Not in CEL: `dataset.fields` and
`reward.function`, whose strings have no length bound, so the API server could price their
rules over its CEL cost budget; non-finite numbers, which JSON cannot carry to the API server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rlhf_operator import api, builders
from rlhf_trainer.config import (
    READER_FORMATS,
    REWARD_FUNCTION_NAMES,
    GRPOOptions,
    Hyperparameters,
    PPOOptions,
    RRHFOptions,
)

Schema = dict[str, Any]

# Stages whose trainer splits batchSize over its ranks (preflight.micro_batch_size).
TRAINED_TYPES: frozenset[str] = api.POLICY_TYPES | {"reward"}
# Stages whose output is no model: evaluate writes eval.json, feedback preference pairs.
NO_MODEL: dict[str, str] = {"evaluate": "its evaluation", "feedback": "preference pairs"}
MODULE_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$", re.ASCII)
READS: dict[str, str] = {
    "sft": "supervised rows or pairs",
    "preference": "pairs or ranked rows",
    "ranked": "ranked rows or pairs",
    "prompts": "prompts",
}


def problems(run: api.RLHFRun) -> list[str]:
    """Every stage-start failure that the spec alone decides, one `field: message` each."""
    spec, out = run.spec, []
    seen: dict[str, api.Stage] = {}
    for index, stage in enumerate(spec.stages):
        where = f"spec.stages[{index}]"
        out += source_problems(where, stage, seen)
        out += dataset_problems(where, stage)
        out += batch_problems(where, stage, spec.trainer)
        out += reward_function_problems(where, stage)
        rollout = rollout_problem(spec.trainer, index, stage)
        out += [rollout] if rollout is not None else []
        seen.setdefault(stage.name, stage)
    return out


def source_problems(where: str, stage: api.Stage, seen: dict[str, api.Stage]) -> list[str]:
    """`from` must name a stage that writes a model this stage can start from."""
    source = seen.get(stage.from_) if stage.from_ is not None else None
    if source is None:
        return []  # no `from`, or one the graph check already refused
    if source.type in NO_MODEL:
        return [
            f"{where}.from: {source.name!r} ({source.type}) writes {NO_MODEL[source.type]}, "
            "not a model; name a stage that trains one, or leave `from` out to start from "
            "spec.model"
        ]
    if source.type == "reward" and stage.type != "reward":
        return [
            f"{where}.from: {source.name!r} is a reward stage, whose output scores responses "
            f"(a sequence classifier) and is no policy to start a {stage.type} stage from; "
            "name a policy stage (sft, dpo, rrhf, ppo, grpo) or leave `from` out, and give "
            "the reward model as reward.from"
        ]
    return []


def reader(stage: api.Stage) -> str:
    """Which data.py reader the stage's trainer feeds `dataset` to (preflight, feedback)."""
    if stage.type == "sft":
        return "sft"
    if stage.type in ("reward", "dpo"):
        return "preference"
    offline_rrhf = stage.type == "rrhf" and not builders.is_online(stage)
    if offline_rrhf or (stage.type == "feedback" and stage.rollout is None):
        return "ranked"
    return "prompts"


def dataset_problems(where: str, stage: api.Stage) -> list[str]:
    """Each dataset of the stage in a format its reader takes."""
    offline = "offline " if stage.type == "rrhf" and reader(stage) == "ranked" else ""
    checks = [("dataset", stage.dataset, reader(stage), f"the {offline}{stage.type} trainer")]
    if stage.ppo is not None:
        checks.append(("ppo.ptxDataset", stage.ppo.ptx_dataset, "sft", "the ptx LM loss"))
    if stage.evaluate is not None:
        options = stage.evaluate
        checks.append(("evaluate.referenceDataset", options.reference_dataset, "sft", "perplexity"))
        checks.append(("evaluate.preferenceDataset", options.preference_dataset, "preference",
                       "reward-model accuracy"))  # fmt: skip
    out = []
    for field, dataset, read, what in checks:
        formats = READER_FORMATS[read]
        if stage.type == "feedback" and field == "dataset":  # the judge reads no chat rows yet
            formats = tuple(f for f in formats if f != "chat")
        if dataset is not None and dataset.format not in formats:
            out.append(
                f"{where}.{field}.format: {dataset.format!r} cannot feed {what}, which reads "
                f"{READS[read]}; use one of {', '.join(formats)}"
            )
    return out


def online_shape(stage: api.Stage) -> tuple[str, int, int, int] | None:
    """(block, prompts per rollout step, samples per prompt that batchSize counts,
    maxNewTokens) of an online stage, as preflight._check_online reads them; else None."""
    if stage.type == "ppo":
        ppo = stage.ppo or PPOOptions()
        return "ppo", ppo.rollout_batch_size, 1, ppo.max_new_tokens
    if stage.type == "grpo":
        grpo = stage.grpo or GRPOOptions()
        return "grpo", grpo.rollout_batch_size, grpo.num_generations, grpo.max_new_tokens
    if builders.is_online(stage) and stage.rrhf is not None:  # batchSize counts queries
        return "rrhf", stage.rrhf.rollout_batch_size, 1, stage.rrhf.max_new_tokens
    return None


def batch_problems(where: str, stage: api.Stage, trainer: api.Trainer) -> list[str]:
    """batchSize splits over the ranks, and an online step's samples over batchSize."""
    if stage.type not in TRAINED_TYPES:
        return []  # evaluate splits prompts as they come; feedback runs on rank 0
    hp, out = stage.hyperparameters, []
    field = f"{where}.hyperparameters"
    world, procs = trainer.nodes * trainer.procs_per_node, trainer.procs_per_node
    if hp.batch_size % (world * hp.gradient_accumulation):
        out.append(
            f"{field}.batchSize: {hp.batch_size} does not divide into {world} ranks "
            f"(spec.trainer: {trainer.nodes} nodes x {procs} processes) x "
            f"{hp.gradient_accumulation} gradient-accumulation steps; set batchSize to a "
            f"multiple of {world * hp.gradient_accumulation}, or change gradientAccumulation"
        )
    shape = online_shape(stage)
    if shape is None:
        return out
    block, prompts, per_prompt, max_new = shape
    if max_new >= hp.max_length:
        out.append(
            f"{field}.maxLength: {hp.max_length} leaves no room for prompts after "
            f"{block}.maxNewTokens {max_new}; raise maxLength or lower maxNewTokens"
        )
    samples = prompts * per_prompt
    if samples % hp.batch_size:
        out.append(
            f"{field}.batchSize: {hp.batch_size} samples per optimizer step do not divide the "
            f"{samples} samples of a rollout step ({block}.rolloutBatchSize {prompts} x "
            f"{per_prompt}); pick a divisor of {samples}"
        )
    return out


def reward_function_problems(where: str, stage: api.Stage) -> list[str]:
    """A built-in reward function, or `module:callable` where the trainer imports one."""
    name = stage.reward.function if stage.reward is not None else None
    if name is None or name in REWARD_FUNCTION_NAMES:
        return []
    builtin = ", ".join(REWARD_FUNCTION_NAMES)
    if not MODULE_CALLABLE.match(name):
        return [
            f"{where}.reward.function: unknown reward function {name!r}; use a built-in one "
            f"({builtin}) or `module:callable`, a module on the trainer's allow-list"
        ]
    if stage.type in ("rrhf", "evaluate") and not builders.is_online(stage):
        kind = "an offline rrhf" if stage.type == "rrhf" else "an evaluate"
        return [
            f"{where}.reward.function: {kind} stage scores with a built-in reward function "
            f"({builtin}); `module:callable` applies to ppo, grpo and online rrhf stages"
        ]
    return []


def rollout_problem(trainer: api.Trainer, index: int, stage: api.Stage) -> str | None:
    """What an online stage's rollout asks for that cannot run, or None. The planner refuses
    it too (servers.online_stage_problem), as `rlhf render` alone did before."""
    if not builders.is_online(stage):
        return None
    where = f"spec.stages[{index}]"
    rollout = stage.rollout or api.Rollout()
    if rollout.engine not in ("vllm", api.IN_TRAINER):
        return (
            f"{where}.rollout.engine: {rollout.engine!r} cannot serve rollouts yet (it has no "
            "weight-reload API this project drives); use vllm or trainer"
        )
    if rollout.weight_sync == "nccl" and trainer.gpus_per_node == 0:
        return (
            f"{where}.rollout.weightSync: nccl moves weights GPU to GPU, but "
            "spec.trainer.gpusPerNode is 0; use weightSync disk, or give the trainer GPUs"
        )
    if stage.lora is not None and rollout.weight_sync == "nccl":
        return (
            f"{where}.rollout.weightSync: a LoRA stage syncs only its adapters, which the "
            "servers load from the workspace; set weightSync to disk"
        )
    return None


# -- The CEL mirrors (crd.py attaches them) -----------------------------------------------------
# The test harness, like an API server that has not defaulted a block the spec leaves out, sees
# no defaults inside an unset block, so each rule reads a field through `_or`.


def _cel_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _or(obj: str, path: str, default: Any) -> str:
    """CEL for `obj.path`, or the model's `default` where it (or a block above it) is unset."""
    parts = path.split(".")
    has = " && ".join(f"has({obj}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))
    literal = f"'{default}'" if isinstance(default, str) else str(default).lower()
    return f"({has} ? {obj}.{path} : {literal})"


def _default(model: type[Any], field: str) -> Any:
    return model.model_fields[field].default


def _online(s: str) -> str:
    return (
        f"({s}.type in {_cel_list(sorted(builders.ONLINE_STAGE_TYPES))} || "
        f"({s}.type == 'rrhf' && {_or(s, 'rrhf.online', False)}))"
    )


def _format_rule(dataset: str, formats: Iterable[str], what: str, when: str = "") -> Schema:
    """`dataset` (a field of the rule's model) in one of `formats`, where `when` holds."""
    fmt = _or("self", f"{dataset}.format", "jsonl")
    formats = list(formats)
    return {
        "rule": f"{f'!({when}) || ' if when else ''}!has(self.{dataset}) || "
        f"{fmt} in {_cel_list(formats)}",
        "message": f"{dataset}.format: {what} reads {', '.join(formats)}",
        "fieldPath": f".{dataset}.format",
        "reason": "FieldValueInvalid",
    }


def _online_rules() -> list[Schema]:
    """preflight._check_online: room for prompts, and whole minibatches per rollout step."""
    max_length = _or("self", "hyperparameters.maxLength", _default(Hyperparameters, "max_length"))
    batch = _or("self", "hyperparameters.batchSize", _default(Hyperparameters, "batch_size"))
    online_rrhf = f"self.type == 'rrhf' && {_or('self', 'rrhf.online', False)}"
    out = []
    for block, when, model, per_prompt in (
        ("ppo", "self.type == 'ppo'", PPOOptions, "1"),
        (
            "grpo",
            "self.type == 'grpo'",
            GRPOOptions,
            _or("self", "grpo.numGenerations", _default(GRPOOptions, "num_generations")),
        ),
        ("rrhf", online_rrhf, RRHFOptions, "1"),
    ):
        new = _or("self", f"{block}.maxNewTokens", _default(model, "max_new_tokens"))
        prompts = _or("self", f"{block}.rolloutBatchSize", _default(model, "rollout_batch_size"))
        out += [
            {
                "rule": f"!({when}) || {new} < {max_length}",
                "message": f"{block}.maxNewTokens leaves no room for prompts in "
                "hyperparameters.maxLength; raise maxLength",
                "fieldPath": ".hyperparameters.maxLength",
                "reason": "FieldValueInvalid",
            },
            {
                "rule": f"!({when}) || ({prompts} * {per_prompt}) % {batch} == 0",
                "message": "hyperparameters.batchSize must divide the samples of a rollout step "
                f"({block}.rolloutBatchSize x samples per prompt)",
                "fieldPath": ".hyperparameters.batchSize",
                "reason": "FieldValueInvalid",
            },
        ]
    return out


def _stage_rules() -> list[Schema]:
    online = _online("self")
    sync = _or("self", "rollout.weightSync", "disk")
    feedback = tuple(f for f in READER_FORMATS["prompts"] if f != "chat")
    readers = [
        ("self.type == 'sft'", READER_FORMATS["sft"], "an sft stage"),
        ("self.type in ['dpo', 'reward']", READER_FORMATS["preference"], "a reward or dpo stage"),
        (f"self.type == 'rrhf' && !{online}", READER_FORMATS["ranked"], "an offline rrhf stage"),
        ("self.type == 'feedback'", feedback, "a feedback stage"),
    ]
    return [
        *(_format_rule("dataset", formats, what, when) for when, formats, what in readers),
        *_online_rules(),
        {
            "rule": f"!{online} || {_or('self', 'rollout.engine', 'vllm')} != 'lmdeploy'",
            "message": "rollout.engine: lmdeploy cannot serve an online stage's rollouts yet; "
            "use vllm or trainer",
            "fieldPath": ".rollout.engine",
            "reason": "FieldValueForbidden",
        },
        {
            "rule": f"!{online} || !has(self.lora) || {sync} != 'nccl'",
            "message": "rollout.weightSync: a LoRA stage syncs its adapters from disk; set "
            "weightSync to disk",
            "fieldPath": ".rollout.weightSync",
            "reason": "FieldValueInvalid",
        },
    ]


def _spec_rules() -> list[Schema]:
    """What needs spec.trainer: the ranks a batch splits over, GPUs for nccl."""
    gpus = _or("self", "trainer.gpusPerNode", 0)
    procs = (
        f"(has(self.trainer) && has(self.trainer.nprocPerNode) ? "
        f"self.trainer.nprocPerNode : ({gpus} > 0 ? {gpus} : 1))"
    )
    ranks = f"{_or('self', 'trainer.nodes', 1)} * {procs}"
    batch = _or("s", "hyperparameters.batchSize", _default(Hyperparameters, "batch_size"))
    accumulation = _or("s", "hyperparameters.gradientAccumulation", 1)
    return [
        {
            "rule": f"self.stages.all(s, !(s.type in {_cel_list(sorted(TRAINED_TYPES))}) || "
            f"{batch} % ({ranks} * {accumulation}) == 0)",
            "message": "a stage's hyperparameters.batchSize must be a multiple of trainer.nodes "
            "x processes per node x its gradientAccumulation; `rlhf validate` names the stage",
            "fieldPath": ".stages",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"self.stages.all(s, !{_online('s')} || "
            f"{_or('s', 'rollout.weightSync', 'disk')} != 'nccl') || {gpus} > 0",
            "message": "rollout.weightSync nccl moves weights GPU to GPU, but "
            "trainer.gpusPerNode is 0; use weightSync disk, or give the trainer GPUs",
            "fieldPath": ".trainer.gpusPerNode",
            "reason": "FieldValueInvalid",
        },
    ]


# Rules by the name of the model whose schema they attach to.
CEL_RULES: dict[str, list[Schema]] = {
    "SFTOptions": [
        {
            "rule": "!has(self.packing) || !self.packing",
            "message": "packing is not implemented yet; set it to false",
            "fieldPath": ".packing",
            "reason": "FieldValueForbidden",
        }
    ],
    "PPOOptions": [
        {
            "rule": "!has(self.ptxCoef) || !(self.ptxCoef > 0.0) || has(self.ptxDataset)",
            "message": "ptxCoef > 0 mixes in an LM loss on supervised data; set ptxDataset",
            "fieldPath": ".ptxDataset",
            "reason": "FieldValueRequired",
        },
        {
            "rule": "!has(self.klController) || self.klController != 'adaptive' || "
            "has(self.klTarget)",
            "message": "the adaptive KL controller needs a target KL; set klTarget",
            "fieldPath": ".klTarget",
            "reason": "FieldValueRequired",
        },
        _format_rule("ptxDataset", READER_FORMATS["sft"], "the ptx LM loss"),
    ],
    "EvaluateOptions": [
        _format_rule("referenceDataset", READER_FORMATS["sft"], "perplexity"),
        _format_rule("preferenceDataset", READER_FORMATS["preference"], "reward-model accuracy"),
    ],
    "Stage": _stage_rules(),
    "RLHFRunSpec": _spec_rules(),
}
STAGE_LIST_RULES: list[Schema] = [
    {
        "rule": "self.all(s, !has(s.from) || !self.exists(t, t.name == s.from && "
        f"(t.type in {_cel_list(sorted(NO_MODEL))} || (t.type == 'reward' && "
        "s.type != 'reward'))))",
        "message": "`from` must name a stage that writes a model: not evaluate or feedback, "
        "and a reward stage only for another reward stage",
        "reason": "FieldValueInvalid",
    }
]
