"""Pure builders of the environment servers of a multi-turn grpo stage: `Deployment`s and
`Service`s.

A grpo stage with `environment` (and no `url`) gets one Deployment and one Service per
`environment.replicas`, named `<run>-<stage>-env-<i>` and labelled
`rlhf.dev/component=environment`, for as long as the stage runs, exactly as its rollout servers
(servers.py): the planner starts the trainer once they are available and removes them when the
stage finishes. The trainer gets one Service URL per replica (`StageConfig.environment.urls`;
an episode stays on one), or the `url` of an environment that already runs, with no children.

The container listens on `environment.port`, declared as the port `http` that the Service,
the probes (`GET /health`) and the chart's PodMonitor (`/metrics`) use. The env var PORT holds
the port, first in the env list, so that `$(PORT)` in command, args and later env values names
it: the kubelet expands `$(VAR)` from the container's env, and the local executor does the same
with the port it picked. With no `image` the trainer image runs the command (it has
`rlhf env serve NAME --port N`). The workspace is mounted at /workspace as in trainer pods, so an
environment reads task files at the paths a stage config names.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from rlhf_operator import api, builders, servers
from rlhf_operator.objects import Obj
from rlhf_trainer.config import EnvironmentTarget, EpisodeOptions

COMPONENT_ENVIRONMENT = "environment"
# Seconds between startup probes: an environment starts in seconds, not a model's minutes.
STARTUP_PERIOD = 5


def environment_name(run: api.RLHFRun, stage: str, replica: int) -> str:
    """Deployment and Service name of one environment server replica."""
    return builders.child_name(run, stage, f"env-{replica}")


def runs_servers(stage: api.Stage) -> bool:
    """Whether the operator runs the stage's environment (it has one, and no `url`)."""
    return stage.environment is not None and stage.environment.url is None


def environment_target(run: api.RLHFRun, stage: api.Stage) -> EnvironmentTarget | None:
    """How the trainer reaches the stage's environment: one Service URL per replica, or the
    spec's `url`; None without an environment."""
    env = stage.environment
    if env is None:
        return None
    if env.url is not None:
        urls = [env.url]
    else:
        namespace = run.metadata.namespace
        urls = [
            f"http://{environment_name(run, stage.name, i)}.{namespace}.svc:{env.port}"
            for i in range(env.replicas)
        ]
    options = {f: getattr(env, f) for f in EpisodeOptions.model_fields}
    return EnvironmentTarget(urls=urls, **options)


def _container_env(env: api.Environment) -> list[Obj]:
    return [
        {"name": api.ENV_SERVER_PORT_VAR, "value": str(env.port)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "RLHF_WORKSPACE", "value": builders.WORKSPACE_MOUNT},
        *({"name": e.name, "value": e.value} for e in env.env),
    ]


def environment_container(run: api.RLHFRun, env: api.Environment) -> Obj:
    """The server container; the image's entrypoint runs when `command` is unset."""
    startup = max(1, math.ceil(env.startup_timeout_seconds / STARTUP_PERIOD))
    container: Obj = {
        "name": servers.SERVER_CONTAINER,
        "image": env.image or run.spec.trainer.image,
        "env": _container_env(env),
        "ports": [{"name": "http", "containerPort": env.port, "protocol": "TCP"}],
        # Without a startup probe, liveness would restart a server still loading its tasks.
        "startupProbe": servers.probe("/health", STARTUP_PERIOD, startup),
        "readinessProbe": servers.probe("/health", 5, 3),
        "livenessProbe": servers.probe("/health", 10, 6),
        "volumeMounts": [{"name": "workspace", "mountPath": builders.WORKSPACE_MOUNT}],
        # The rollout servers' settings: a user's image may run as root (no runAsNonRoot), and
        # root needs DAC_OVERRIDE for the workspace folders the trainer's user owns.
        "securityContext": copy.deepcopy(servers.SERVER_SECURITY),
    }
    if env.command is not None:
        container["command"] = list(env.command)
    if env.args is not None:
        container["args"] = list(env.args)
    resources = builders.gpu_resources(env.resources, 0)
    if resources:
        container["resources"] = resources
    return container


def environment_children(run: api.RLHFRun, stage: api.Stage) -> list[Obj]:
    """Every environment server of the stage, Deployment then Service per replica; [] without
    an environment, or with one at a `url`."""
    env = stage.environment
    if env is None or env.url is not None:
        return []
    out: list[Obj] = []
    for replica in range(env.replicas):
        name = environment_name(run, stage.name, replica)
        deployment = servers.build_server_deployment(
            run,
            stage.name,
            name,
            replica,
            environment_container(run, env),
            math.ceil(env.startup_timeout_seconds),
            component=COMPONENT_ENVIRONMENT,
            volumes=[builders.workspace_volume(run)],
        )
        service = servers.build_server_service(
            run, stage.name, name, replica, component=COMPONENT_ENVIRONMENT, port_number=env.port
        )
        out += [deployment, service]
    return out


# The CRD's mirror of api.Environment's checks (crd.py attaches them): `url`, or a server to run
# (command and/or image), never both. Fields with a default are compared to it, since the API
# server fills defaults in before it evaluates the rules.
def _unset_rule(field: str, unset: Any) -> str:
    if unset is None:
        return f"!has(self.{field})"
    if unset == []:
        return f"!has(self.{field}) || size(self.{field}) == 0"
    if isinstance(unset, api.ResourceRequirements):
        return " && ".join(
            f"(!has(self.{field}) || !has(self.{field}.{part}) || "
            f"size(self.{field}.{part}) == 0)"
            for part in ("requests", "limits")
        )
    return f"!has(self.{field}) || self.{field} == {unset}"


CEL_RULES: list[Obj] = [
    {
        "rule": "has(self.url) || has(self.command) || has(self.image)",
        "message": "set `url` (an environment server that already runs) or `command` and/or "
        "`image` (a server the operator runs)",
        "reason": "FieldValueRequired",
    },
    *(
        {
            "rule": f"!has(self.url) || ({_unset_rule(field, unset)})",
            "message": f"`url` names an environment server that already runs, so {field} "
            "does not apply",
            "fieldPath": f".{field}",
            "reason": "FieldValueForbidden",
        }
        for field, unset in api.URL_EXCLUDES
    ),
    {
        "rule": f"!has(self.env) || self.env.all(e, e.name != '{api.ENV_SERVER_PORT_VAR}')",
        "message": "PORT is set to `port` by the operator; set port instead",
        "fieldPath": ".env",
        "reason": "FieldValueForbidden",
    },
    {
        "rule": "!has(self.env) || self.env.all(e, self.env.exists_one(f, f.name == e.name))",
        "message": "each env name may be set once",
        "fieldPath": ".env",
        "reason": "FieldValueDuplicate",
    },
]
