"""Every rendered object against the schema that admits it on a real cluster.

Custom resources (PyTorchJob, TrainJob, PodMonitor, ServiceMonitor, PrometheusRule, Issuer,
Certificate) against the upstream CRDs that conventions.json names; built-in kinds against
Kubernetes' own schemas through kubernetes-validate, strict, for the oldest and the newest
Kubernetes supported. See upstream.py for what "against a CRD" covers.
"""

from __future__ import annotations

from typing import Any

import pytest
from render import EXAMPLES, StageRender, chart_values
from upstream import K8S_VERSIONS, Upstream, describe, object_key

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
SCENARIOS = sorted(chart_values())


def problems_of(upstream: Upstream, objs: list[Obj], where: str) -> list[str]:
    return [
        f"{where}: {describe(obj)}: {problem}"
        for obj in objs
        for problem in upstream.problems(obj, K8S_VERSIONS)
    ]


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_every_stage_renders_its_trainer(
    renders: dict[str, list[StageRender]], example: str
) -> None:
    """Each stage, once the ones before it succeeded, renders exactly one trainer job."""
    for stage in renders[example]:
        assert stage.current_stage == stage.stage.name, stage.where
        assert len(stage.jobs()) == 1, f"{stage.where}: {[describe(c) for c in stage.children]}"


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_example_children_conform(
    upstream: Upstream, renders: dict[str, list[StageRender]], example: str
) -> None:
    found = [p for r in renders[example] for p in problems_of(upstream, r.children, r.where)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_objects_conform(
    upstream: Upstream, chart: dict[str, list[Obj]], scenario: str
) -> None:
    found = problems_of(upstream, chart[scenario], f"chart [{scenario}]")
    assert not found, "\n".join(found)


def test_upstream_runtimes_conform(upstream: Upstream, runtimes: dict[str, Obj]) -> None:
    """The checker admits upstream's own ClusterTrainingRuntime (and any the chart ships)."""
    assert "torch-distributed" in runtimes
    found = problems_of(upstream, list(runtimes.values()), "runtime")
    assert not found, "\n".join(found)


def test_trainjobs_need_trainer_v2_2(
    upstream: Upstream, renders: dict[str, list[StageRender]]
) -> None:
    """TrainJobs patch the runtime through `spec.runtimePatches` (Kubeflow Trainer v2.2+);
    Trainer v2.1's schema, the last with `podTemplateOverrides`, refuses them. The install
    guide's compatibility table says so."""
    jobs = [j for rs in renders.values() for r in rs for j in r.jobs() if j["kind"] == "TrainJob"]
    assert jobs, "no example renders a TrainJob"
    old = upstream.compat_schemas(object_key(jobs[0]))
    assert old, "conventions.json lists no older TrainJob schema"
    for job in jobs:
        assert "runtimePatches" in job["spec"], describe(job)
        for schema in old:
            refused = schema.problems(job)
            assert any("runtimePatches" in p for p in refused), (schema.source, refused)
