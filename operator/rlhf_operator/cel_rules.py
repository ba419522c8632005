"""CEL rules that say in the CRD what CEL can of spec_checks.py and of the config validators
that came with them; crd.py attaches them, so `kubectl apply` refuses what `rlhf validate`
refuses.

Not in CEL: `dataset.fields` and `reward.function`, whose strings have no length bound, so the
API server could price their rules over its CEL cost budget; non-finite numbers, which JSON
cannot carry to the API server.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rlhf_operator import builders
from rlhf_operator.spec_checks import NO_MODEL, TRAINED_TYPES
from rlhf_trainer.config import (
    READER_FORMATS,
    GRPOOptions,
    Hyperparameters,
    PPOOptions,
    RRHFOptions,
)

Schema = dict[str, Any]

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
