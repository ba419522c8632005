"""The rules of the spec's own shape, which the API models' validators apply (api.py): the
fields each stage type needs, what `rollout.engine: trainer` excludes, and the stage graph.

Each is a function returning problem lines, so crd.py can say the same rules in CEL and the
validators raise the first one. Kept apart from the models so api.py holds the types alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_trainer.config import option_blocks, stage_types

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFRunSpec, Rollout, Stage

# The rollout engine that is no server: the trainer samples from its own weights.
IN_TRAINER = "trainer"


def trainer_engine_problems(rollout: Rollout) -> list[str]:
    """Server settings that mean nothing when the trainer generates (engine `trainer`)."""
    if rollout.engine != IN_TRAINER:
        return []
    problems = []
    for field, value, default in (
        ("replicas", rollout.replicas, 1),
        ("tensorParallelSize", rollout.tensor_parallel_size, 1),
        ("weightSync", rollout.weight_sync, "disk"),
        ("image", rollout.image, None),
    ):
        if value != default:
            problems.append(
                f"rollout.{field}: engine `trainer` runs no servers, so {field} does not apply; "
                f"remove it or use engine vllm"
            )
    return problems


# Which fields each stage type needs, and which option blocks belong to which type: derived
# from the stage table (rlhf_trainer.config.stages). Mirrored by CEL rules in the CRD (crd.py)
# so `kubectl apply` refuses what `rlhf validate` refuses.
NEEDS_DATASET: frozenset[str] = stage_types(lambda kind: kind.needs_dataset)
LORA_TYPES: frozenset[str] = stage_types(lambda kind: kind.lora)
# Stage types whose output is a policy (a causal LM), i.e. what `evaluate.policies` may name.
POLICY_TYPES: frozenset[str] = stage_types(lambda kind: kind.trains_policy)
NEEDS_REWARD: frozenset[str] = stage_types(lambda kind: kind.needs_reward)
OPTION_BLOCKS: dict[str, str] = option_blocks()


# Formats whose rows hold no alternative responses: a feedback stage must sample them.
PROMPT_ONLY_FORMATS: frozenset[str] = frozenset({"jsonl", "prompts"})


def stage_type_problems(stage: Stage) -> list[str]:
    problems = []
    if stage.from_ is not None and stage.model is not None:
        problems.append("set `from` (an earlier stage's output) or `model`, not both")
    if stage.type in NEEDS_DATASET and stage.dataset is None:
        problems.append(f"a `{stage.type}` stage needs `dataset`")
    if stage.type in NEEDS_REWARD and stage.reward is None and stage.environment is None:
        problems.append(
            f"a `{stage.type}` stage needs `reward` ({{from|judge|function}}), or, for grpo, an "
            "`environment` whose episodes are rewarded"
        )
    if stage.type == "rrhf" and stage.rrhf is not None and stage.rrhf.online and not stage.reward:
        problems.append(
            "an online `rrhf` stage needs `reward` ({from|judge|function}) to score its samples"
        )
    for field, owner in OPTION_BLOCKS.items():
        if getattr(stage, field) is not None and stage.type != owner:
            alias = type(stage).model_fields[field].alias or field
            problems.append(f"`{alias}` options apply to `{owner}` stages, not `{stage.type}`")
    if stage.lora is not None and stage.type not in LORA_TYPES:
        problems.append(
            f"`lora` applies to {', '.join(sorted(LORA_TYPES))} stages, not `{stage.type}`"
        )
    if stage.type == "evaluate" and (stage.evaluate is None or not stage.evaluate.policies):
        problems.append("an `evaluate` stage needs `evaluate.policies` (the stages to compare)")
    problems += _in_trainer_problems(stage)
    if (
        stage.type == "feedback"
        and stage.rollout is None
        and stage.dataset is not None
        and stage.dataset.format in PROMPT_ONLY_FORMATS
    ):
        problems.append(
            f"a `feedback` stage with a `{stage.dataset.format}` dataset has no responses to "
            "judge: set `rollout` to sample them from the policy, or use ranked or pair data"
        )
    return problems


def _in_trainer_problems(stage: Stage) -> list[str]:
    """What a stage cannot combine with `rollout.engine: trainer`."""
    if stage.rollout is None or stage.rollout.engine != IN_TRAINER:
        return []
    problems = []
    if stage.type == "feedback":
        problems.append(
            "rollout.engine: a `feedback` stage samples on servers (engine vllm or lmdeploy); "
            "`trainer` applies to ppo, grpo and rrhf"
        )
    if stage.lora is not None:
        problems.append("rollout.engine: `trainer` does not generate with LoRA adapters yet; "
                        "drop `lora` or use engine vllm")  # fmt: skip
    options = stage.ppo or stage.grpo or stage.rrhf
    if options is not None and options.async_:
        problems.append(
            f"{stage.type}.async: with rollout.engine `trainer` generation and training share the "
            "trainer's devices and weights; set async to false or use engine vllm"
        )
    return problems


def stage_graph_problems(spec: RLHFRunSpec) -> list[str]:
    """Unique names; every `from` and `reward.from` names an earlier stage; judge when needed."""
    problems: list[str] = []
    seen: dict[str, Stage] = {}
    for index, stage in enumerate(spec.stages):
        where = f"stages[{index}]"
        if stage.name in seen:
            problems.append(f"{where}.name: duplicate stage name {stage.name!r}")
        if stage.from_ is not None and stage.from_ not in seen:
            problems.append(
                f"{where}.from: {stage.from_!r} is not an earlier stage; "
                f"name one of {sorted(seen) or 'the stages before it'}"
            )
        if stage.reward is not None and stage.reward.from_ is not None:
            source = seen.get(stage.reward.from_)
            if source is None or source.type != "reward":
                problems.append(
                    f"{where}.reward.from: {stage.reward.from_!r} is not an earlier `reward` stage"
                )
        for policy in stage.evaluate.policies if stage.evaluate else []:
            if policy not in seen or seen[policy].type not in POLICY_TYPES:
                problems.append(
                    f"{where}.evaluate.policies: {policy!r} is not an earlier stage that trains a "
                    f"policy ({', '.join(sorted(POLICY_TYPES))})"
                )
        needs_judge = stage.type == "feedback" or (
            stage.reward is not None and stage.reward.judge is not None
        )
        if needs_judge and spec.judge is None:
            problems.append(f"{where}: uses the AI judge, so `spec.judge` must be set")
        seen.setdefault(stage.name, stage)
    return problems
