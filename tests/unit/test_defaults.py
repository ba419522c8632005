"""Install defaults from the Helm values fill in what a run leaves unset, and nothing else."""

from __future__ import annotations

import json

import pytest

from helpers import make_run, manifest
from rlhf_operator import api
from rlhf_operator.defaults import with_install_defaults

pytestmark = pytest.mark.unit

ENV = {
    "RLHF_DEFAULT_TRAINER_IMAGE": "registry.local/trainer:1",
    "RLHF_DEFAULT_TRAINER_RESOURCES": json.dumps({"requests": {"cpu": "8"}}),
    "RLHF_DEFAULT_VLLM_IMAGE": "registry.local/vllm:2",
    "RLHF_DEFAULT_LMDEPLOY_IMAGE": "registry.local/lmdeploy:3",
    "RLHF_DEFAULT_LMDEPLOY_RESOURCES": json.dumps({"limits": {"nvidia.com/gpu": 1}}),
}


def online_run(**trainer: object) -> api.RLHFRun:
    doc = manifest(trainer=trainer) if trainer else manifest()
    doc["spec"]["judge"] = {"engine": "lmdeploy", "model": {"path": "models/judge"}}
    doc["spec"]["stages"][1] = {
        "name": "fb", "type": "feedback", "rollout": {"replicas": 1},
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    }
    return make_run(doc)


def test_defaults_fill_unset_images_and_resources() -> None:
    run = with_install_defaults(online_run(), ENV)
    assert run.spec.trainer.image == "registry.local/trainer:1"
    assert run.spec.trainer.resources.requests == {"cpu": "8"}
    rollout = run.spec.stages[1].rollout
    assert rollout is not None and rollout.image == "registry.local/vllm:2"
    assert run.spec.judge is not None and run.spec.judge.image == "registry.local/lmdeploy:3"
    assert run.spec.judge.resources.limits == {"nvidia.com/gpu": 1}


def test_values_the_run_sets_win() -> None:
    run = with_install_defaults(
        online_run(image="mine:1", resources={"limits": {"cpu": 2}}), ENV
    )
    assert run.spec.trainer.image == "mine:1"
    assert run.spec.trainer.resources.limits == {"cpu": 2}
    assert run.spec.trainer.resources.requests == {}


def test_no_env_changes_nothing() -> None:
    run = online_run()
    assert with_install_defaults(run, {}) == run


def test_bad_resources_json_names_the_env_var() -> None:
    with pytest.raises(api.SpecError) as err:
        with_install_defaults(online_run(), {"RLHF_DEFAULT_TRAINER_RESOURCES": "{cpu: 4"})
    assert "RLHF_DEFAULT_TRAINER_RESOURCES" in str(err.value)
