"""Generate the `rlhfruns.rlhf.dev` CustomResourceDefinition from the typed model.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema: no
`$ref`, no `anyOf` with null, `nullable` instead, int-or-string as an extension, defaults that
apply server-side. The CEL rules mirror the cross-field checks in `api.py` and, where CEL can
say them, `cel_rules.py`'s, so `kubectl apply` refuses what `rlhf validate` refuses.
"""

from __future__ import annotations

import copy
from typing import Any

from rlhf_operator import api, cel_rules, env_servers, names

Schema = dict[str, Any]

_DROP = {"title", "additionalProperties", "prefixItems"}


def _type_list(types: frozenset[str]) -> str:
    return "[" + ", ".join(f"'{t}'" for t in sorted(types)) + "]"


_STAGE_LIST_RULES: list[Schema] = [
    {
        "rule": "self.all(s, self.exists_one(t, t.name == s.name))",
        "message": "stage names must be unique",
        "reason": "FieldValueDuplicate",
    },
    {
        "rule": "self.all(s, !has(s.from) || ("
        "self.map(t, t.name).indexOf(s.from) >= 0 && "
        "self.map(t, t.name).indexOf(s.from) < self.map(t, t.name).indexOf(s.name)))",
        "message": "`from` must name an earlier stage",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "self.all(s, !has(s.reward) || !has(s.reward.from) || "
        "self.exists(t, t.name == s.reward.from && t.type == 'reward' && "
        "self.map(u, u.name).indexOf(t.name) < self.map(u, u.name).indexOf(s.name)))",
        "message": "`reward.from` must name an earlier `reward` stage",
        "reason": "FieldValueInvalid",
    },
    {
        "rule": "self.all(s, !has(s.evaluate) || s.evaluate.policies.all(p, "
        "self.exists(t, t.name == p && t.type in "
        + _type_list(api.POLICY_TYPES)
        + " && self.map(u, u.name).indexOf(t.name) < self.map(u, u.name).indexOf(s.name))))",
        "message": "`evaluate.policies` must name earlier stages that train a policy",
        "reason": "FieldValueInvalid",
    },
]


def _stage_rules() -> list[Schema]:
    rules: list[Schema] = [
        {
            "rule": "!(has(self.from) && has(self.model))",
            "message": "set `from` (an earlier stage's output) or `model`, not both",
            "fieldPath": ".model",
            "reason": "FieldValueForbidden",
        },
        {
            "rule": f"!(self.type in {_type_list(api.NEEDS_DATASET)}) || has(self.dataset)",
            "message": "this stage type needs `dataset`",
            "fieldPath": ".dataset",
            "reason": "FieldValueRequired",
        },
        {
            "rule": f"!(self.type in {_type_list(api.NEEDS_REWARD)}) || has(self.reward) || "
            "has(self.environment)",
            "message": "ppo and grpo stages need `reward` ({from|judge|function}), or, for grpo, "
            "an `environment` whose episodes are rewarded",
            "fieldPath": ".reward",
            "reason": "FieldValueRequired",
        },
        {
            "rule": "!(self.type == 'rrhf' && has(self.rrhf) && has(self.rrhf.online) && "
            "self.rrhf.online) || has(self.reward)",
            "message": "an online rrhf stage needs `reward` ({from|judge|function})",
            "fieldPath": ".reward",
            "reason": "FieldValueRequired",
        },
    ]
    rules.append(
        {
            "rule": f"!has(self.lora) || self.type in {_type_list(api.LORA_TYPES)}",
            "message": f"`lora` applies to {', '.join(sorted(api.LORA_TYPES))} stages",
            "fieldPath": ".lora",
            "reason": "FieldValueForbidden",
        }
    )
    rules.append(
        {
            "rule": "self.type != 'evaluate' || "
            "(has(self.evaluate) && size(self.evaluate.policies) > 0)",
            "message": "an evaluate stage needs `evaluate.policies`",
            "fieldPath": ".evaluate",
            "reason": "FieldValueRequired",
        }
    )
    rules.append(
        {
            # An absent format is the default, jsonl: prompts only.
            "rule": "self.type != 'feedback' || has(self.rollout) || !has(self.dataset) || "
            "(has(self.dataset.format) && "
            f"!(self.dataset.format in {_type_list(api.PROMPT_ONLY_FORMATS)}))",
            "message": "a feedback stage on a prompts-only dataset needs `rollout` to sample "
            "the responses it judges",
            "fieldPath": ".rollout",
            "reason": "FieldValueRequired",
        }
    )
    rules += _in_trainer_rules()
    for field, owner in api.OPTION_BLOCKS.items():
        alias = api.Stage.model_fields[field].alias or field
        rules.append(
            {
                "rule": f"!has(self.{alias}) || self.type == '{owner}'",
                "message": f"`{alias}` options apply to `{owner}` stages only",
                "fieldPath": f".{alias}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


_IN_TRAINER = "has(self.rollout) && has(self.rollout.engine) && self.rollout.engine == 'trainer'"


def _in_trainer_rules() -> list[Schema]:
    """What a stage cannot combine with `rollout.engine: trainer`
    (stage_rules._in_trainer_problems)."""
    asynchronous = " || ".join(
        f"(has(self.{block}) && has(self.{block}.async) && self.{block}.async)"
        for block in ("ppo", "grpo", "rrhf")
    )
    return [
        {
            "rule": f"!({_IN_TRAINER}) || self.type != 'feedback'",
            "message": "a feedback stage samples on servers: rollout.engine vllm or lmdeploy",
            "fieldPath": ".rollout.engine",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!({_IN_TRAINER}) || !has(self.lora)",
            "message": "rollout.engine `trainer` does not generate with LoRA adapters yet",
            "fieldPath": ".lora",
            "reason": "FieldValueForbidden",
        },
        {
            "rule": f"!({_IN_TRAINER}) || !({asynchronous})",
            "message": "async overlaps generation on servers with training; with rollout.engine "
            "`trainer` set it to false",
            "fieldPath": ".rollout.engine",
            "reason": "FieldValueInvalid",
        },
    ]


# stage_rules.trainer_engine_problems: server settings with no servers.
_ROLLOUT_RULES: list[Schema] = [
    {
        "rule": f"!has(self.engine) || self.engine != 'trainer' || !has(self.{field}) || "
        f"self.{field} == {value}",
        "message": f"engine `trainer` runs no servers, so {field} does not apply",
        "fieldPath": f".{field}",
        "reason": "FieldValueForbidden",
    }
    for field, value in (("replicas", "1"), ("tensorParallelSize", "1"), ("weightSync", "'disk'"))
] + [
    {
        "rule": "!has(self.engine) || self.engine != 'trainer' || !has(self.image)",
        "message": "engine `trainer` runs no servers, so image does not apply",
        "fieldPath": ".image",
        "reason": "FieldValueForbidden",
    }
]

_ONE_SOURCE = [
    {"rule": "has(self.name) != has(self.path)", "message": "set exactly one of `name` or `path`"}
]

# Rules attached wherever a model's schema is inlined, keyed by the model's name.
_MODEL_RULES: dict[str, list[Schema]] = {
    "ModelSource": _ONE_SOURCE,
    "DatasetSpec": _ONE_SOURCE,
    "RewardSource": [
        {
            "rule": "[has(self.from), has(self.judge), has(self.function)]"
            ".filter(x, x).size() == 1",
            "message": "set exactly one of `from`, `judge` or `function`",
        }
    ],
    "Stage": _stage_rules(),
    "Rollout": _ROLLOUT_RULES,
    "Environment": env_servers.CEL_RULES,
    "RLHFRunSpec": [
        {
            "rule": "has(self.judge) || !self.stages.exists(s, s.type == 'feedback' || "
            "(has(s.reward) && has(s.reward.judge)))",
            "message": "a stage uses the AI judge, so `judge` must be set",
            "fieldPath": ".judge",
            "reason": "FieldValueRequired",
        }
    ],
}


def _name_rules() -> list[Schema]:
    """Root rules on `self.metadata.name` (the only metadata CEL may read, with generateName):
    what upstream refuses of the names derived from it and the stage names (names.py)."""
    trainer = "has(self.spec.trainer) && has(self.spec.trainer.{0})"
    nodes = f"({trainer.format('nodes')} ? self.spec.trainer.nodes : 1)"
    trainjob = f"({trainer.format('backend')} && self.spec.trainer.backend == 'trainjob')"
    jobset = len(names.JOBSET_POD_INFIX) + len(names.JOBSET_POD_RANDOM)
    suffix = (
        f"({trainjob} ? {jobset} + size(string({nodes} - 1)) : ({nodes} > 1 ? "
        f"{len(names.PYTORCHJOB_WORKER)} + size(string({nodes} - 2)) : "
        f"{len(names.PYTORCHJOB_MASTER)}))"
    )
    return [
        {
            "rule": f"self.metadata.name.matches('{names.DNS_1035.pattern}')",
            "message": "metadata.name must start with a letter (a DNS-1035 label): every "
            "child's name begins with it, and PyTorchJob, TrainJob and Service names must",
        },
        {
            "rule": f"self.spec.stages.all(s, size(self.metadata.name) + 1 + size(s.name) + "
            f"{suffix} <= {names.MAX_LABEL})",
            "message": "metadata.name and a spec.stages[].name are too long together: "
            "<run>-<stage>-master-0 and -worker-<nodes - 2> (PyTorchJob replica Services) or "
            "<run>-<stage>-node-0-<nodes - 1>-xxxxx (TrainJob pods) must fit in 63 "
            "characters; `rlhf validate` names the stage",
        },
    ]


def _structural(node: Schema, defs: dict[str, Schema], name: str | None = None) -> Schema:
    """Rewrite one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        merged = {**copy.deepcopy(defs[ref]), **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, ref)
    if "anyOf" in node:
        return _structural(_collapse_any_of(node), defs, name)
    out: Schema = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = copy.deepcopy(value)
    if node.get("type") == "array" and "prefixItems" in node:
        out["items"] = _structural(node["prefixItems"][0], defs)
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if node.get("type") == "object" and "properties" in node:
        _default_factories(out, node)
    rules = _MODEL_RULES.get(name or "", []) + cel_rules.CEL_RULES.get(name or "", [])
    if rules:
        out["x-kubernetes-validations"] = copy.deepcopy(rules)
    return out


def _collapse_any_of(node: Schema) -> Schema:
    options = [o for o in node["anyOf"] if o.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    types = sorted(o.get("type", "") for o in options)
    if types == ["integer", "string"]:
        return {**rest, "x-kubernetes-int-or-string": True}
    if len(options) != 1:
        raise ValueError(f"cannot express anyOf {node['anyOf']} in a structural schema")
    return {**options[0], **rest}


def _default_factories(out: Schema, node: Schema) -> None:
    """Fields built by default_factory: default to {} (or []) so nested defaults apply."""
    required = set(node.get("required", []))
    for key, prop in node["properties"].items():
        if key in required or "default" in prop or "anyOf" in prop:
            continue
        target = out["properties"][key]
        if target.get("type") == "object" and "properties" in target:
            target["default"] = {}
        elif target.get("type") in ("array", "object"):
            target["default"] = [] if target["type"] == "array" else {}


def spec_schema() -> Schema:
    raw = api.RLHFRunSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs, "RLHFRunSpec")
    schema["properties"]["stages"]["x-kubernetes-validations"] = copy.deepcopy(
        _STAGE_LIST_RULES + cel_rules.STAGE_LIST_RULES
    )
    return schema


def status_schema() -> Schema:
    raw = api.RunStatus.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step",
     "description": "Step of the current stage"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.reward",
     "description": "Latest mean reward of the current stage"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> Schema:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "rlhf"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An RLHF pipeline: SFT, reward model or AI feedback, "
                            "then PPO, RRHF, DPO or GRPO.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "required": ["spec"],
                            "x-kubernetes-validations": _name_rules(),
                        }
                    },
                }
            ],
        },
    }
