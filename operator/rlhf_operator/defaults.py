"""Install-time defaults: the images and resources the Helm values give the operator.

The chart passes them as env vars (`RLHF_DEFAULT_{TRAINER,VLLM,LMDEPLOY}_{IMAGE,RESOURCES}`);
they fill in what a run leaves unset, so a platform team can pin images for everyone. A value
the run sets itself always wins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from rlhf_operator import api

ENGINES = ("vllm", "lmdeploy")


def _resources(env: Mapping[str, str], key: str) -> api.ResourceRequirements | None:
    raw = env.get(key)
    if not raw:
        return None
    try:
        return api.ResourceRequirements.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as err:
        # Reported like a spec problem (a Degraded condition), naming the Helm value to fix.
        raise api.SpecError(
            [f"operator env {key} (Helm value defaults.*.resources): expected JSON like "
             f'{{"requests": {{"cpu": "4"}}}}: {err}']
        ) from err


def _unset(resources: api.ResourceRequirements) -> bool:
    return not resources.requests and not resources.limits


def _server(obj: Any, env: Mapping[str, str], engine: str) -> Any:
    """A Rollout or Judge with the engine's default image and resources filled in."""
    updates: dict[str, Any] = {}
    prefix = f"RLHF_DEFAULT_{engine.upper()}"
    if obj.image is None and env.get(f"{prefix}_IMAGE"):
        updates["image"] = env[f"{prefix}_IMAGE"]
    resources = _resources(env, f"{prefix}_RESOURCES")
    if resources is not None and _unset(obj.resources):
        updates["resources"] = resources
    return obj.model_copy(update=updates) if updates else obj


def with_install_defaults(run: api.RLHFRun, env: Mapping[str, str]) -> api.RLHFRun:
    """The run with install defaults applied where the spec is silent."""
    spec = run.spec
    trainer = spec.trainer
    updates: dict[str, Any] = {}
    if "image" not in trainer.model_fields_set and env.get("RLHF_DEFAULT_TRAINER_IMAGE"):
        updates["image"] = env["RLHF_DEFAULT_TRAINER_IMAGE"]
    resources = _resources(env, "RLHF_DEFAULT_TRAINER_RESOURCES")
    if resources is not None and _unset(trainer.resources):
        updates["resources"] = resources
    stages = [
        s.model_copy(update={"rollout": _server(s.rollout, env, s.rollout.engine)})
        if s.rollout is not None and s.rollout.engine in ENGINES  # `trainer`: no servers
        else s
        for s in spec.stages
    ]
    judge = _server(spec.judge, env, spec.judge.engine) if spec.judge is not None else None
    new_spec = spec.model_copy(
        update={
            "trainer": trainer.model_copy(update=updates) if updates else trainer,
            "stages": stages,
            "judge": judge,
        }
    )
    return run.model_copy(update={"spec": new_spec})
