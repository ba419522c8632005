"""What a stage would refuse only when it starts, checked when the run is parsed.

Without these, `rlhf validate` passed specs that failed at their stage's start, after every
earlier stage's GPU hours (issue 23): a dataset format the stage's reader refuses, a batch that
does not split over the ranks, an unknown reward function, a `from` that names no policy,
rollout settings the planner refuses. `api.parse_run` (so `rlhf validate`, the admission webhook
and `rlhf run`) runs them once the models validate; each problem is one `spec.field.path: what is
wrong; the fix` line. The trainer checks the same again at stage start (preflight.py,
data/readers.py).

`refusal` is what the planner refuses when it plans (a Degraded condition, SpecRefused), which
`rlhf validate` lets pass; cel_rules.py says in the CRD what CEL can of the parse-time checks.
"""

from __future__ import annotations

import re

from rlhf_operator import api, builders, engine_versions
from rlhf_trainer.config import (
    READER_FORMATS,
    REWARD_FUNCTION_NAMES,
    STAGES,
    GRPOOptions,
    PPOOptions,
    stage_types,
)

# Stages whose trainer splits batchSize over its ranks (preflight.micro_batch_size).
TRAINED_TYPES: frozenset[str] = stage_types(lambda kind: kind.trains)
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
    """Which data/readers.py reader the stage's trainer feeds `dataset` to (preflight, feedback)."""
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
    it too (`online_stage_problem`), as `rlhf render` alone did before."""
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


# -- Refused when planned ------------------------------------------------------------------------
# `rlhf validate` accepts these; the planner refuses them with a Degraded condition
# (SpecRefused) and renders nothing. They stay at plan time: the server image is checked again
# after the operator's install defaults (defaults.py) filled in an unset one, which parsing
# does not see, and the rest always reached users there (`rlhf render`, the run's status).

# Stage types with a trainer: every row of the stage table (a type declared in `StageType`
# without a row would be refused with a Degraded condition).
SUPPORTED_STAGE_TYPES: frozenset[str] = frozenset(STAGES)
SUPPORTED_BACKENDS: frozenset[str] = frozenset({"pytorchjob", "trainjob"})


def refusal(run: api.RLHFRun) -> str | None:
    """Why this spec cannot run yet (an unsupported stage type or backend), or None."""
    for index, stage in enumerate(run.spec.stages):
        if stage.type not in SUPPORTED_STAGE_TYPES:
            return (
                f"spec.stages[{index}].type: stage type {stage.type!r} is not supported yet; "
                f"supported: {', '.join(sorted(SUPPORTED_STAGE_TYPES))}"
            )
        online = online_stage_problem(run, index, stage)
        if online is not None:
            return online
        offline = offline_stage_problem(index, stage)
        if offline is not None:
            return offline
    trainer = run.spec.trainer
    if trainer.backend not in SUPPORTED_BACKENDS:
        return f"spec.trainer.backend: {trainer.backend!r} is not supported yet"
    if trainer.backend == "trainjob" and trainer.scheduler_name:
        return (
            "spec.trainer.schedulerName: a TrainJob takes its scheduler from its "
            "ClusterTrainingRuntime (spec.podGroupPolicy); unset schedulerName, or use "
            "backend pytorchjob"
        )
    return None


def online_stage_problem(run: api.RLHFRun, index: int, stage: api.Stage) -> str | None:
    """What an online stage asks for that cannot run yet, naming the field, or None. Parsing
    refuses the rollout settings already; the planner keeps them as a guard, and checks the
    server image again once the install defaults have filled in an unset one."""
    problem = rollout_problem(run.spec.trainer, index, stage)
    if problem is not None or not builders.is_online(stage):
        return problem
    # Again here, after the operator's install defaults filled in an unset image.
    server = engine_versions.stage_server(index, stage)
    return engine_versions.server_problem(server) if server is not None else None


def offline_stage_problem(index: int, stage: api.Stage) -> str | None:
    """What an offline rrhf or evaluate stage asks for that cannot run yet, or None."""
    where = f"spec.stages[{index}]"
    offline = stage.type == "evaluate" or (stage.type == "rrhf" and not builders.is_online(stage))
    if offline and stage.reward is not None and stage.reward.judge:
        return (
            f"{where}.reward.judge: {stage.type} scores responses with reward.from (a reward "
            "stage) or reward.function; the AI judge is not supported here yet"
        )
    return None
