"""Kueue (conventions.json `kueue`, kubernetes-sigs/kueue v0.19.2): a queued run's jobs are
admitted as a whole, and the install guide says which integrations to turn on.

Kueue admits a labelled job as one Workload (all its pods together) and un-suspends it. A pod
template carrying the queue label would make each pod a Workload of its own (the pod
integration), and a labelled Deployment a serving workload: so the label goes on the job alone.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from render import EXAMPLES, ROOT, load_example, stage_renders
from upstream import Upstream, describe

from rlhf_operator import backends
from rlhf_operator.planner import refusal

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
QUEUE = "team-a-queue"
INSTALL = ROOT / "docs" / "INSTALL.md"


def label_paths(node: Any, key: str, path: str = "") -> list[str]:
    """Every path at which `key` is a key of a mapping inside `node`."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            found += [here] if k == key else label_paths(v, key, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += label_paths(v, key, f"{path}[{i}]")
    return found


def queue_problems(obj: Obj, key: str, managed_kinds: set[str]) -> list[str]:
    """Where the queue label may not be: in any pod template, and on any object of a kind a
    Kueue integration manages other than the job. (Kueue has no integration for ConfigMaps
    and Services; a label there only marks them.)"""
    paths = label_paths(obj, key)
    if obj["kind"] in backends.JOB_KINDS:
        value = (obj["metadata"].get("labels") or {}).get(key)
        wrong = [p for p in paths if p != f"metadata.labels.{key}"]
        missing = [] if value == QUEUE else [f"metadata.labels[{key}] is {value!r}, not {QUEUE!r}"]
        return missing + [f"{p}: the queue label belongs on the job only" for p in wrong]
    if obj["kind"] not in managed_kinds:
        paths = [p for p in paths if p != f"metadata.labels.{key}"]
    return [f"{p}: the queue label belongs on the job only" for p in paths]


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_queue_label_is_on_the_job_only(upstream: Upstream, example: str) -> None:
    """Every example, queued, on each backend: each stage's job carries the label; no pod
    template (of the job, its runtime patches, or a server) and no server Deployment does."""
    key = upstream.kueue["queue_label"]
    managed = set(upstream.kueue["framework_of_kind"])
    path = next(p for p in EXAMPLES if p.stem == example)
    found = []
    for backend in sorted(backends.BACKENDS):
        run = load_example(path, labels={key: QUEUE}, backend=backend)
        if refusal(run) is not None:  # e.g. schedulerName on TrainJob: nothing is rendered
            continue
        for render in stage_renders(run, f"queued, {backend}"):
            for child in render.children:
                problems = queue_problems(child, key, managed)
                found += [f"{render.where}: {describe(child)}: {p}" for p in problems]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_jobs_are_suspendable_where_kueue_looks(upstream: Upstream, example: str) -> None:
    """Kueue suspends a job at creation and un-suspends it on admission, at the path its
    integration reads (`spec.runPolicy.suspend`, `spec.suspend`): the job has a boolean there,
    true when the run is suspended (a queued job may be created suspended: Kueue's webhook
    would suspend it anyway)."""
    suspend_paths = upstream.kueue["suspend_path"]
    path = next(p for p in EXAMPLES if p.stem == example)
    run = load_example(path, labels={upstream.kueue["queue_label"]: QUEUE})
    for render in stage_renders(run, "queued"):
        for job in render.jobs():
            value: Any = job
            for key in suspend_paths[job["kind"]]:
                value = value.get(key) if isinstance(value, dict) else None
            assert isinstance(value, bool), (render.where, describe(job), value)
            assert value or not run.spec.suspend, (render.where, describe(job), value)
            assert tuple(suspend_paths[job["kind"]]) == (
                backends.for_kind(job["kind"]).suspend_path
            )


def kueue_rows() -> dict[str, list[str]]:
    """The install guide's Kueue table: the cells of each row, by the integration (framework)
    name in its second cell."""
    rows = {}
    for line in INSTALL.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([a-z0-9./-]+)`", cells[1]) if len(cells) > 2 else None
        if line.startswith("|") and match:
            rows[match[1]] = cells
    return rows


def test_install_guide_names_the_kueue_integrations(upstream: Upstream) -> None:
    """Each backend's Kueue integration is in the guide's table, which says whether Kueue
    v0.19 enables it by default and whether it is deprecated."""
    kueue = upstream.kueue
    rows = kueue_rows()
    for backend in backends.BACKENDS.values():
        framework = kueue["framework_of_kind"][backend.kind]
        cells = rows.get(framework)
        assert cells is not None, f"docs/INSTALL.md: no Kueue table row for `{framework}`"
        default = framework in kueue["default_frameworks"]
        assert cells[2].lower().startswith("yes" if default else "no"), (framework, cells)
        deprecated = framework in kueue["deprecated_frameworks"]
        assert ("deprecated" in " ".join(cells).lower()) == deprecated, (framework, cells)
