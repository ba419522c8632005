"""Environment servers of a multi-turn grpo stage against upstream: the Deployments and
Services conform to Kubernetes' schemas and name rules, and the chart's PodMonitors scrape each
environment pod's /metrics exactly once.

No example runs an environment of every shape, so the grpo example gets each here: a command
run in the trainer image (two replicas, another port, resources, env), an image's own
entrypoint with args, and an environment at a url (no children).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from render import ROOT, RUN_UID, StageRender, backend_runs, pod_templates, stage_renders
from scrape import POD_IP, scraped
from upstream import DNS1035, K8S_VERSIONS, Upstream, describe

from rlhf_operator import builders, env_servers

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
EXAMPLE = ROOT / "manifests" / "examples" / "grpo-reward-function.yaml"
MONITORING = "monitoring"  # the chart scenario with the workload PodMonitors on
ENVIRONMENTS: dict[str, Obj] = {
    "command": {
        "command": ["rlhf", "env", "serve", "calculator", "--port", "$(PORT)"],
        "replicas": 2,
        "port": 9000,
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": 1}},
        "env": [{"name": "LEVEL", "value": "3"}, {"name": "ADDRESS", "value": ":$(PORT)"}],
    },
    "image": {"image": "example.com/envs/maze:1.2", "args": ["--port", "$(PORT)"]},
    "url": {"url": "http://maze.envs.svc:8080", "maxTurns": 6},
}


def with_environment(path: Path, environment: Obj, tmp_path: Path) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["uid"] = RUN_UID
    grpo = next(s for s in doc["spec"]["stages"] if s["type"] == "grpo")
    grpo["environment"] = environment
    out = tmp_path / f"{doc['metadata']['name']}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


@pytest.fixture(params=sorted(ENVIRONMENTS))
def env_renders(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[StageRender]]:
    """Every stage's children of the example with the environment, on every backend."""
    path = with_environment(EXAMPLE, ENVIRONMENTS[request.param], tmp_path)
    out = [r for label, run in backend_runs(path) for r in stage_renders(run, label)]
    return request.param, out


def environment_children(render: StageRender) -> list[Obj]:
    return [
        c for c in render.children
        if c["metadata"]["labels"].get(builders.LABEL_COMPONENT)
        == env_servers.COMPONENT_ENVIRONMENT
    ]


def test_environment_children_conform(
    upstream: Upstream, env_renders: tuple[str, list[StageRender]]
) -> None:
    shape, stages = env_renders
    found: list[str] = []
    for render in stages:
        children = environment_children(render)
        if render.stage.type != "grpo" or shape == "url":
            assert children == [], render.where
            continue
        replicas = int(ENVIRONMENTS[shape].get("replicas", 1))
        assert [c["kind"] for c in children] == ["Deployment", "Service"] * replicas
        assert any(c["kind"] == "PyTorchJob" or c["kind"] == "TrainJob"
                   for c in render.children), render.where  # fmt: skip
        for child in children:
            name = child["metadata"]["name"]
            if not DNS1035.match(name) or len(name) > 63:
                found.append(f"{render.where}: {describe(child)} is not a DNS-1035 label")
            found += [
                f"{render.where}: {describe(child)}: {p}"
                for p in upstream.problems(child, K8S_VERSIONS)
            ]
    assert not found, "\n".join(found)


def test_each_environment_pod_is_scraped_once(
    chart: dict[str, list[Obj]], env_renders: tuple[str, list[StageRender]]
) -> None:
    """Through the PodMonitor `<release>-environments`, on the pod's port `http`, at /metrics,
    with the run, stage and component target labels the alerts group by."""
    monitors = [o for o in chart[MONITORING] if o["kind"] == "PodMonitor"]
    for render in env_renders[1]:
        for child in environment_children(render):
            for where, pod in pod_templates(child):
                [container] = pod["spec"]["containers"]
                [port] = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
                hits = scraped(pod, monitors)
                assert hits == [("rlhf-operator-environments", "/metrics", f"{POD_IP}:{port}")], (
                    f"{render.where}: {describe(child)} {where}: {hits}"
                )


def test_the_trainer_config_names_each_environment(
    env_renders: tuple[str, list[StageRender]],
) -> None:
    shape, stages = env_renders
    for render in stages:
        if render.stage.type != "grpo":
            continue
        configmap = next(c for c in render.children if c["kind"] == "ConfigMap")
        config = yaml.safe_load(next(iter(configmap["data"].values())))
        urls = config["environment"]["urls"]
        if shape == "url":
            assert urls == ["http://maze.envs.svc:8080"], render.where
            continue
        services = [c for c in environment_children(render) if c["kind"] == "Service"]
        namespace = render.run.metadata.namespace
        assert urls == [
            f"http://{s['metadata']['name']}.{namespace}.svc:{s['spec']['ports'][0]['port']}"
            for s in services
        ], render.where
