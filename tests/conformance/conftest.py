"""The conformance tier: rendered objects against upstream schemas and conventions.

Run it with `make conformance [UPSTREAM=DIR]`; the tests read the upstream folder named by
`RLHF_UPSTREAM` (default: ../shared/upstream beside the checkout). A missing folder or file is a
failure, never a skip. `make test` deselects this tier (`-m 'not conformance'` in pyproject).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from render import (
    EXAMPLES,
    ROOT,
    StageRender,
    backend_runs,
    chart_scenarios,
    lmdeploy_runs,
    stage_renders,
)
from upstream import Upstream, UpstreamMissing

DEFAULT_UPSTREAM = ROOT.parent / "shared" / "upstream"


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    root = Path(os.environ.get("RLHF_UPSTREAM") or DEFAULT_UPSTREAM).resolve()
    try:
        return Upstream.load(root)
    except UpstreamMissing as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def chart() -> dict[str, list[dict[str, Any]]]:
    """Every values scenario of tests/unit/test_chart.py, rendered once."""
    return chart_scenarios()


@pytest.fixture(scope="session")
def renders(upstream: Upstream) -> dict[str, list[StageRender]]:
    """Every stage of every example (by file stem), under every variant (render.variants)."""
    lmdeploy = sorted(upstream.engines["lmdeploy"]["flags_files"])
    out: dict[str, list[StageRender]] = {}
    for path in EXAMPLES:
        found = out.setdefault(path.stem, [])
        for label, run in backend_runs(path):
            for variant, each in lmdeploy_runs(label, run, lmdeploy):
                found.extend(stage_renders(each, variant))
    return out


@pytest.fixture(scope="session")
def runtimes(upstream: Upstream, chart: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """ClusterTrainingRuntimes a TrainJob may name: upstream's, and any the chart installs."""
    out = upstream.runtimes()
    for objs in chart.values():
        out.update(
            {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterTrainingRuntime"}
        )
    return out
