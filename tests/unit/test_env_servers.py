"""Environment servers of a multi-turn grpo stage: the API's checks, the Deployments and
Services the operator runs (only while the stage runs), the URLs the trainer gets, and the
local executor running one as a process on a free port."""

from __future__ import annotations

import copy
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import job_with, make_run, manifest
from rlhf_operator import api, builders, env_servers, servers
from rlhf_operator.local import LocalExecutor, preflight
from rlhf_operator.local_servers import local_environment_argv
from rlhf_operator.planner import Observed, plan
from rlhf_trainer.config import StageConfig

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
COMMAND = ["rlhf", "env", "serve", "calculator", "--port", "$(PORT)"]
GRPO: Obj = {
    "name": "grpo",
    "type": "grpo",
    "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    "reward": {"function": "brief"},
    "environment": {"command": COMMAND, "replicas": 2, "maxTurns": 3, "concurrency": 8},
}
NEXT: Obj = {**GRPO, "name": "grpo2", "from": "grpo"}
NEXT.pop("environment")


def run_with(environment: Obj | None = None, *stages: Obj, **spec: Any) -> api.RLHFRun:
    first = GRPO if environment is None else {**GRPO, "environment": environment}
    return make_run(manifest(stages=[first, *stages], **spec))


def name(obj: Obj) -> str:
    return str(obj["metadata"]["name"])


def container(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def available(obj: Obj) -> Obj:
    if obj["kind"] != "Deployment":
        return obj
    status = {"availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}
    return {**copy.deepcopy(obj), "status": status}


# -- rendered objects ---------------------------------------------------------------------------


def test_deployment_and_service_per_replica() -> None:
    run = run_with()
    children = env_servers.environment_children(run, run.spec.stages[0])
    assert [(c["kind"], name(c)) for c in children] == [
        ("Deployment", "demo-grpo-env-0"), ("Service", "demo-grpo-env-0"),
        ("Deployment", "demo-grpo-env-1"), ("Service", "demo-grpo-env-1"),
    ]  # fmt: skip
    for child in children:
        kubernetes_validate.validate(child, "1.34", strict=True)
        labels = child["metadata"]["labels"]
        assert labels[builders.LABEL_COMPONENT] == "environment"
        assert labels[builders.LABEL_RUN] == "demo" and labels[builders.LABEL_STAGE] == "grpo"
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("RLHFRun", "demo", "uid-1")
    deployment, service = children[:2]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert children[2]["spec"]["selector"]["matchLabels"]["rlhf.dev/replica"] == "1"
    assert deployment["spec"]["progressDeadlineSeconds"] == 600
    c = container(deployment)
    assert c["image"] == api.DEFAULT_TRAINER_IMAGE and c["command"] == COMMAND
    assert "args" not in c
    assert c["env"][0] == {"name": "PORT", "value": "8000"}  # first: later values may use it
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 600
    assert c["securityContext"] == servers.SERVER_SECURITY
    assert c["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]
    assert "resources" not in c
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}
    ]


def test_image_port_args_env_and_resources_reach_the_container() -> None:
    environment = {
        "image": "example.com/envs/maze:1",
        "args": ["--listen", "0.0.0.0:$(PORT)"],
        "port": 9090,
        "startupTimeoutSeconds": 12,
        "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
        "env": [{"name": "MAZE_SIZE", "value": "7"}, {"name": "ADDRESS", "value": ":$(PORT)"}],
    }
    run = run_with(environment)
    deployment, service = env_servers.environment_children(run, run.spec.stages[0])
    kubernetes_validate.validate(deployment, "1.34", strict=True)
    c = container(deployment)
    assert c["image"] == "example.com/envs/maze:1"
    assert "command" not in c and c["args"] == ["--listen", "0.0.0.0:$(PORT)"]
    env = [(e["name"], e["value"]) for e in c["env"]]
    assert env[0] == ("PORT", "9090") and env[-2:] == [("MAZE_SIZE", "7"), ("ADDRESS", ":$(PORT)")]
    assert c["ports"][0]["containerPort"] == 9090 and service["spec"]["ports"][0]["port"] == 9090
    assert c["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}}
    assert deployment["spec"]["progressDeadlineSeconds"] == 12
    assert c["startupProbe"]["failureThreshold"] == 3  # 12 s at one probe each 5 s


def test_the_trainer_gets_one_service_url_per_replica_and_the_episode_options() -> None:
    run = run_with()
    data = builders.build_configmap(run, run.spec.stages[0])["data"]["grpo.yaml"]
    config = StageConfig.model_validate(yaml.safe_load(data))  # as the trainer reads it back
    assert config.environment is not None
    assert config.environment.urls == [
        "http://demo-grpo-env-0.team-a.svc:8000",
        "http://demo-grpo-env-1.team-a.svc:8000",
    ]
    assert (config.environment.max_turns, config.environment.concurrency) == (3, 8)
    assert config.environment.timeout_seconds == 30.0
    assert config.environment.startup_timeout_seconds == 600.0


def test_an_environment_at_a_url_runs_no_servers() -> None:
    run = run_with({"url": "http://maze.envs.svc:8080", "timeoutSeconds": 5})
    stage = run.spec.stages[0]
    assert env_servers.environment_children(run, stage) == []
    target = builders.build_stage_config(run, stage).environment
    assert target is not None and target.urls == ["http://maze.envs.svc:8080"]
    assert target.timeout_seconds == 5
    first = plan(run, Observed())
    assert not any("-env-" in name(c) for c in first.children)
    assert builders.build_stage_config(run, run.spec.stages[0]).rollout is not None


def test_suspend_scales_environment_servers_to_zero() -> None:
    run = run_with(suspend=True)
    deployment = env_servers.environment_children(run, run.spec.stages[0])[0]
    assert deployment["spec"]["replicas"] == 0


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "problem"),
    [
        (
            {**GRPO, "type": "ppo"},
            "spec.stages[0]: `environment` options apply to `grpo` stages, not `ppo`",
        ),
        (
            {**GRPO, "environment": {"url": "http://env:8000", "command": COMMAND}},
            "spec.stages[0].environment.command: `url` names an environment server that "
            "already runs, so command does not apply; remove command, or remove url",
        ),
        (
            {**GRPO, "environment": {"url": "http://env:8000", "replicas": 2}},
            "spec.stages[0].environment.replicas: `url` names an environment server",
        ),
        (
            {**GRPO, "environment": {"url": "http://env:8000", "image": "e:1"}},
            "spec.stages[0].environment.image: `url` names an environment server",
        ),
        (
            {**GRPO, "environment": {"url": "http://env:8000", "env": [{"name": "A"}]}},
            "spec.stages[0].environment.env: `url` names an environment server",
        ),
        (
            {**GRPO, "environment": {"maxTurns": 2}},
            "spec.stages[0].environment: set `url` (an environment server that already runs) "
            "or `command` and/or `image`",
        ),
        (
            {**GRPO, "environment": {"args": ["--port", "$(PORT)"]}},
            "spec.stages[0].environment: set `url`",
        ),
        (
            {**GRPO, "environment": {"command": COMMAND, "env": [{"name": "PORT", "value": "1"}]}},
            "spec.stages[0].environment.env: PORT is set to `port` by the operator; set port",
        ),
        (
            {**GRPO, "environment": {"command": COMMAND, "env": [{"name": "A"}] * 2}},
            "spec.stages[0].environment.env: A set more than once",
        ),
        (
            {**GRPO, "environment": {"command": COMMAND, "port": 0}},
            "spec.stages[0].environment.port: Input should be greater than or equal to 1",
        ),
        (
            {**GRPO, "environment": {"url": "env:8000"}},
            "spec.stages[0].environment.url: String should match pattern",
        ),
    ],
)
def test_validation_names_the_field_and_the_fix(stage: Obj, problem: str) -> None:
    with pytest.raises(api.SpecError) as err:
        make_run(manifest(stages=[stage]))
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_a_valid_environment_passes() -> None:
    for environment in (
        {"command": COMMAND},
        {"image": "example.com/env:1"},
        {"image": "example.com/env:1", "command": ["/serve"], "args": ["$(PORT)"]},
        {"url": "https://envs.example.com", "maxTurns": 8, "startupTimeoutSeconds": 60},
    ):
        assert run_with(environment).spec.stages[0].environment is not None


# -- the planner: servers only while the stage runs ---------------------------------------------


def stage_of(p: Any, stage: str) -> api.StageStatus:
    return next(s for s in p.status.stages if s.name == stage)


def components(children: list[Obj], stage: str) -> list[tuple[str, str]]:
    return [
        (c["kind"], c["metadata"]["labels"].get(builders.LABEL_COMPONENT, ""))
        for c in children
        if c["metadata"]["labels"].get(builders.LABEL_STAGE) == stage
    ]


def test_planner_runs_environment_servers_only_while_the_stage_runs() -> None:
    run = run_with(None, NEXT)
    first = plan(run, Observed(now="t0"))
    found = components(first.children, "grpo")
    assert found.count(("Deployment", "environment")) == 2
    assert found.count(("Service", "environment")) == 2
    assert "PyTorchJob" not in [k for k, _ in found]  # the trainer waits for its environment
    assert stage_of(first, "grpo").message == (
        "Waiting for rollout servers: 0/1 available, environment servers: 0/2 available"
    )
    # Rollout up, one environment replica still starting: the trainer keeps waiting.
    some_up = [
        c if name(c) == "demo-grpo-env-1" else available(c) for c in first.children
    ]
    second = plan(run.model_copy(update={"status": first.status}), Observed(some_up, now="t1"))
    assert not any(c["kind"] == "PyTorchJob" for c in second.children)
    assert stage_of(second, "grpo").message == (
        "Waiting for rollout servers: 1/1 available, environment servers: 1/2 available"
    )
    all_up = [available(c) for c in first.children]
    third = plan(run.model_copy(update={"status": second.status}), Observed(all_up, now="t2"))
    job = next(c for c in third.children if c["kind"] == "PyTorchJob")
    # Running: the servers stay.
    running = [*all_up, job_with(job, "Running")]
    fourth = plan(run.model_copy(update={"status": third.status}), Observed(running, now="t3"))
    assert components(fourth.children, "grpo").count(("Deployment", "environment")) == 2
    # Finished: they go, the job stays as the record; the next stage has no environment.
    done = [*all_up, job_with(job, "Running", "Succeeded")]
    fifth = plan(run.model_copy(update={"status": fourth.status}), Observed(done, now="t4"))
    assert stage_of(fifth, "grpo").phase == "Succeeded"
    assert {k for k, _ in components(fifth.children, "grpo")} == {"ConfigMap", "PyTorchJob"}
    assert all(c != "environment" for _, c in components(fifth.children, "grpo2"))
    assert builders.build_stage_config(run, run.spec.stages[1]).environment is None


def test_an_environment_server_that_cannot_start_fails_the_stage_naming_it() -> None:
    run = run_with()
    first = plan(run, Observed(now="t0"))
    broken = []
    for child in first.children:
        child = available(child)
        if name(child) == "demo-grpo-env-1" and child["kind"] == "Deployment":
            child["status"] = {"conditions": [{
                "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing."}]}  # fmt: skip
        broken.append(child)
    failed = plan(run.model_copy(update={"status": first.status}), Observed(broken, now="t1"))
    grpo = stage_of(failed, "grpo")
    assert grpo.phase == "Failed"
    assert grpo.message == (
        "environment server demo-grpo-env-1 failed: ReplicaSet has timed out progressing."
    )
    assert not any(c["kind"] == "Deployment" for c in failed.children)


# -- the local executor -------------------------------------------------------------------------

# Serves GET /health on the port in argv[1], answering with $GREETING.
HEALTH_SERVER = """
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(os.environ["GREETING"].encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def wait_for(executor: LocalExecutor, done: Any, timeout: float = 30.0) -> list[Obj]:
    deadline = time.monotonic() + timeout
    while True:
        observed = executor.servers.observe()
        if done(observed) or time.monotonic() > deadline:
            return observed
        time.sleep(0.1)


def test_an_image_alone_cannot_run_locally(tmp_path: Path) -> None:
    run = run_with({"image": "example.com/env:1"})
    assert preflight(run, tmp_path)[0].startswith(
        "spec.stages[0].environment.command: the environment server is given by its image "
        "(example.com/env:1) alone, which `rlhf run` cannot run; set command"
    )
    assert not any("environment" in p for p in preflight(run_with(), tmp_path))
    url = run_with({"url": "http://127.0.0.1:1"})
    assert not any("environment" in p for p in preflight(url, tmp_path))


def test_local_commands_use_this_interpreter() -> None:
    assert local_environment_argv(["python", "-m", "x"]) == [sys.executable, "-m", "x"]
    assert local_environment_argv(["/opt/serve", "1"]) == ["/opt/serve", "1"]
    rlhf = local_environment_argv(["rlhf", "env", "serve", "calculator"])
    assert Path(rlhf[0]).parent == Path(sys.executable).parent and rlhf[1:] == COMMAND[1:4]


def test_the_local_executor_expands_port_and_waits_for_health(tmp_path: Path) -> None:
    environment = {
        "command": [sys.executable, "-c", HEALTH_SERVER],
        "args": ["$(PORT)"],
        "replicas": 2,
        "env": [{"name": "GREETING", "value": "hello on $(PORT)"}],
    }
    run = run_with(environment)
    children = env_servers.environment_children(run, run.spec.stages[0])
    executor = LocalExecutor(run, tmp_path)
    try:
        executor.servers.apply(children)
        observed = wait_for(executor, lambda objs: servers.readiness(children, objs).ready)
        assert servers.readiness(children, observed).ready, (tmp_path / "demo" / "logs")
        ports = [executor.servers.servers[f"demo-grpo-env-{i}"].port for i in (0, 1)]
        assert 8000 not in ports and ports[0] != ports[1]
        config = builders.build_stage_config(run, run.spec.stages[0]).to_yaml()
        local = yaml.safe_load(executor.servers.rewrite_urls(config))["environment"]["urls"]
        assert local == [f"http://127.0.0.1:{port}" for port in ports]
        with urllib.request.urlopen(f"{local[0]}/health", timeout=5) as reply:
            assert reply.read().decode() == f"hello on {ports[0]}"  # the local port, not 8000
        assert (tmp_path / "demo" / "logs" / "demo-grpo-env-1.log").exists()
        procs = [s.proc for s in executor.servers.servers.values()]
    finally:
        executor.servers.stop_all()
    assert all(p.poll() is not None for p in procs)


def test_an_environment_that_never_gets_healthy_fails_the_stage(tmp_path: Path) -> None:
    environment = {
        "command": [sys.executable, "-c", "import time; time.sleep(60)"],
        "replicas": 1,
        "startupTimeoutSeconds": 1,
    }
    run = run_with(environment)
    children = env_servers.environment_children(run, run.spec.stages[0])
    executor = LocalExecutor(run, tmp_path)
    try:
        executor.servers.apply(children)
        observed = wait_for(executor, lambda objs: servers.readiness(children, objs).failure)
    finally:
        executor.servers.stop_all()
    failure = servers.readiness(children, observed).failure
    assert failure is not None and failure.startswith(
        "environment server demo-grpo-env-0 failed: not ready after 1s"
    )
    failed = plan(run, Observed(children=observed, now="t1"))
    assert stage_of(failed, "grpo").phase == "Failed"
    assert stage_of(failed, "grpo").message == failure
