"""The stage table (rlhf_trainer.config.stages) is where stage types are declared: every type
has a row, and the operator's field rules, the CRD's CEL rules, the planner's supported types,
the builders' online predicate and the trainer's dispatch come from it."""

from __future__ import annotations

import importlib
import typing

import pytest

from rlhf_operator import api, builders, crd, planner, spec_checks
from rlhf_trainer import preflight
from rlhf_trainer.__main__ import TRAINERS
from rlhf_trainer.config import (
    STAGE_TYPES,
    STAGES,
    GRPOOptions,
    OptionBlocks,
    SFTOptions,
    StageConfig,
    StageType,
    online_options,
    options_of,
    samples_online,
    stage_types,
)

pytestmark = pytest.mark.unit


def test_every_stage_type_has_a_row_in_the_order_of_stage_type() -> None:
    assert tuple(STAGES) == STAGE_TYPES == typing.get_args(StageType)
    assert typing.get_args(api.Stage.model_fields["type"].annotation) == STAGE_TYPES


@pytest.mark.parametrize("name", STAGE_TYPES)
def test_each_row_names_real_code_and_fields(name: str) -> None:
    kind = STAGES[name]
    assert callable(getattr(preflight, kind.check))
    for run in filter(None, (kind.run, kind.online_run)):
        module, _, function = run.partition(":")
        # Imported by name, as `python -m rlhf_trainer TYPE` does (torch modules: slow but real).
        assert callable(getattr(importlib.import_module(module), function))
    if kind.online_run is not None:  # chosen by its options block's `online` (__main__)
        [options_class] = [
            t
            for t in typing.get_args(StageConfig.model_fields[kind.options].annotation)
            if t is not type(None)
        ]
        assert "online" in options_class.model_fields
    for block in (kind.options, *kind.blocks):
        assert block in StageConfig.model_fields and block in api.Stage.model_fields


def test_operator_sets_come_from_the_table() -> None:
    assert {n for n, k in STAGES.items() if k.needs_dataset} == api.NEEDS_DATASET
    assert api.NEEDS_REWARD == {"ppo", "grpo"} == stage_types(lambda k: k.needs_reward)
    assert {"sft", "reward", "dpo", "rrhf", "ppo", "grpo"} == api.LORA_TYPES
    assert {"sft", "dpo", "rrhf", "ppo", "grpo"} == api.POLICY_TYPES
    assert {"ppo", "grpo"} == builders.ONLINE_STAGE_TYPES
    assert set(STAGE_TYPES) == planner.SUPPORTED_STAGE_TYPES
    assert api.OPTION_BLOCKS == {
        "sft": "sft", "reward_model": "reward", "dpo": "dpo", "rrhf": "rrhf", "ppo": "ppo",
        "grpo": "grpo", "feedback": "feedback", "evaluate": "evaluate", "environment": "grpo",
    }  # fmt: skip
    assert {n: (k.check, k.run) for n, k in STAGES.items()} == TRAINERS
    assert {"sft", "reward", "dpo", "rrhf", "ppo", "grpo"} == spec_checks.TRAINED_TYPES
    assert {"sft", "reward", "dpo", "rrhf"} == preflight.BATCHED_BY_ROWS


def stage_rules() -> dict[str, list[dict[str, str]]]:
    """The CRD's CEL rules on a stage, by the field each names."""
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stage = schema["properties"]["spec"]["properties"]["stages"]["items"]
    by_field: dict[str, list[dict[str, str]]] = {}
    for rule in stage["x-kubernetes-validations"]:
        by_field.setdefault(rule.get("fieldPath", ""), []).append(rule)
    return by_field


def test_cel_rules_come_from_the_table() -> None:
    rules = stage_rules()
    [lora] = [r for r in rules[".lora"] if "self.type in" in r["rule"]]
    for name in STAGE_TYPES:
        assert (f"'{name}'" in lora["rule"]) == STAGES[name].lora
        assert (name in lora["message"]) == STAGES[name].lora  # the message lists them too
    [dataset] = rules[".dataset"]
    assert all(f"'{name}'" in dataset["rule"] for name in api.NEEDS_DATASET)
    for block, owner in api.OPTION_BLOCKS.items():
        alias = api.Stage.model_fields[block].alias or block
        assert any(r["rule"] == f"!has(self.{alias}) || self.type == '{owner}'"
                   for r in rules[f".{alias}"])  # fmt: skip


def stage_config(stage_type: str, **blocks: object) -> StageConfig:
    return StageConfig.model_validate(
        {"run": "r", "stage": "s", "type": stage_type, "model": {"path": "m"},
         "outputDir": "out", **blocks}
    )  # fmt: skip


def test_options_of_gives_the_block_or_its_defaults() -> None:
    assert options_of(stage_config("grpo")) == GRPOOptions()
    assert options_of(stage_config("grpo", grpo={"maxNewTokens": 7})) == GRPOOptions(
        max_new_tokens=7
    )
    assert options_of(stage_config("sft")) == SFTOptions()
    assert online_options(stage_config("grpo", grpo={"maxNewTokens": 7})).max_new_tokens == 7


@pytest.mark.parametrize(
    ("stage_type", "blocks", "online"),
    [
        ("ppo", {}, True),
        ("grpo", {}, True),  # no grpo block: still online, with its defaults
        ("rrhf", {}, False),
        ("rrhf", {"rrhf": {"online": True}}, True),
        ("sft", {}, False),
        ("evaluate", {}, False),
    ],
)
def test_which_stages_sample_online(
    stage_type: str, blocks: dict[str, object], online: bool
) -> None:
    config = stage_config(stage_type, **blocks)
    assert samples_online(config) is online
    if not online:
        with pytest.raises(TypeError, match="does not sample"):
            online_options(config)


def test_option_blocks_are_declared_once_for_the_spec_and_the_trainer() -> None:
    """Each type's options block is a field of OptionBlocks, which the RLHFRun's stage and the
    trainer's StageConfig both inherit (after their leading fields, so the CRD keeps its order)."""
    assert set(OptionBlocks.model_fields) == {kind.options for kind in STAGES.values()}
    for model in (api.Stage, StageConfig):
        assert issubclass(model, OptionBlocks)
        fields = list(model.model_fields)
        blocks = fields[fields.index("sft") : fields.index("evaluate") + 1]
        assert blocks == list(OptionBlocks.model_fields)
