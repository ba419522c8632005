"""vLLM and lmdeploy servers: flags the image's version accepts, routes it serves, metrics it
exports (conventions.json `engines`: flag and metric lists read from the releases' source)."""

from __future__ import annotations

from typing import Any

import pytest
from render import EXAMPLES, ROOT, StageRender, containers
from upstream import Upstream, describe, version_of

from rlhf_operator import api, builders
from rlhf_operator.env_servers import COMPONENT_ENVIRONMENT

pytestmark = pytest.mark.conformance

Obj = dict[str, Any]
Version = tuple[int, int, int]
ENGINE_METRICS = ROOT / "charts" / "rlhf-operator" / "files" / "engine-metrics.txt"
ENTRY_POINTS = {"vllm": ["vllm", "serve"], "lmdeploy": ["lmdeploy", "serve", "api_server"]}


def release(text: str) -> Version:
    version = version_of(text)
    assert version is not None, f"not a version: {text!r}"
    return version


def dotted(version: Version) -> str:
    return ".".join(map(str, version))


def argv_flags(argv: list[str]) -> list[str]:
    """Option strings in an argv (`--name` or `--name=value`, and short `-x` options)."""
    return [a.split("=", 1)[0] for a in argv if a.startswith("-") and not a[1:2].isdigit()]


def engine_of(argv: list[str]) -> str | None:
    return next((e for e, entry in ENTRY_POINTS.items() if argv[: len(entry)] == entry), None)


def vllm_problems(upstream: Upstream, argv: list[str], version: Version, role: str) -> list[str]:
    vllm = upstream.engines["vllm"]
    out = []
    listed = vllm["flags_version"]
    if dotted(version) != listed:
        out.append(f"no vLLM flag list for {dotted(version)} (upstream has {listed})")
    else:
        known = upstream.lines(vllm["flags_file"])
        flags = argv_flags(argv)
        out += [f"vLLM {dotted(version)} has no flag {f}" for f in flags if f not in known]
    for what, (minimum, why) in vllm["min_version"].items():
        needed = what in argv_flags(argv) or (what.startswith("/") and role == "rollout")
        if needed and version < release(minimum):
            out.append(f"{what} needs vLLM >= {minimum} ({why}); the image is {dotted(version)}")
    return out


def lmdeploy_problems(upstream: Upstream, argv: list[str], version: Version) -> list[str]:
    lmdeploy = upstream.engines["lmdeploy"]
    files = lmdeploy["flags_files"]
    if dotted(version) not in files:
        return [f"no lmdeploy flag list for {dotted(version)} (upstream has {sorted(files)})"]
    known = upstream.lines(files[dotted(version)])
    flags = argv_flags(argv)
    out = [f"lmdeploy {dotted(version)} has no flag {f}" for f in flags if f not in known]
    for flag, (since, why) in lmdeploy["removed"].items():
        removed = version >= release(since)
        if removed and flag in flags:
            out.append(f"{flag} is gone since lmdeploy {since} ({why})")
    # The servers PodMonitor scrapes /metrics: before 0.11 only --enable-metrics serves it.
    metrics_flag = "--enable-metrics"
    since = lmdeploy["removed"][metrics_flag][0]
    if version < release(since) and metrics_flag not in flags:
        out.append(f"lmdeploy {dotted(version)} serves /metrics only with {metrics_flag}")
    if "--disable-metrics" in flags:
        out.append("--disable-metrics: the servers PodMonitor scrapes /metrics")
    return out


def server_problems(upstream: Upstream, obj: Obj) -> list[str]:
    if obj["kind"] != "Deployment":
        return []
    role = (obj["metadata"].get("labels") or {}).get(builders.LABEL_COMPONENT, "")
    if role == COMPONENT_ENVIRONMENT:  # the stage's own environment server, no inference engine
        return []
    out = []
    for container in containers(obj["spec"]["template"]):
        argv = [*container.get("command", []), *container.get("args", [])]
        engine, version = engine_of(argv), version_of(container.get("image", ""))
        if engine is None or version is None:
            out.append(f"{container['name']}: no vLLM or lmdeploy entry point and versioned "
                       f"image: {argv[:3]} {container.get('image')}")
        elif engine == "vllm":
            out += vllm_problems(upstream, argv, version, role)
        else:
            out += lmdeploy_problems(upstream, argv, version)
    return out


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_server_flags_and_routes_exist_upstream(
    upstream: Upstream, renders: dict[str, list[StageRender]], example: str
) -> None:
    """Every flag passed to vLLM is in vLLM 0.32.0's list, every flag passed to lmdeploy in the
    list of the image's version (v0.10.1, v0.16.0); rollout servers' images serve every route
    the trainer calls (min_version); lmdeploy servers export /metrics."""
    found = [
        f"{r.where}: {describe(child)}: {p}"
        for r in renders[example]
        for child in r.children
        for p in server_problems(upstream, child)
    ]
    assert not found, "\n".join(found)


def chart_default_images(chart: dict[str, list[Obj]]) -> dict[str, str]:
    deployment = next(o for o in chart["defaults"] if o["kind"] == "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])
    return {e["name"]: e.get("value", "") for e in env if e["name"].endswith("_IMAGE")}


def test_default_vllm_image_serves_every_route(
    upstream: Upstream, chart: dict[str, list[Obj]]
) -> None:
    """The operator's default vLLM image, and the chart's, are at least every min_version
    (the weight-sync routes and flags), and have a flag list."""
    vllm = upstream.engines["vllm"]
    needed = max(release(v[0]) for v in vllm["min_version"].values())
    images = {"api.DEFAULT_VLLM_IMAGE": api.DEFAULT_VLLM_IMAGE}
    chart_image = chart_default_images(chart).get("RLHF_DEFAULT_VLLM_IMAGE")
    images["chart defaults.vllm.image"] = chart_image or "(not set)"
    for where, image in images.items():
        version = version_of(image)
        assert version is not None and version >= needed, (where, image, needed)
        assert dotted(version) == vllm["flags_version"], (where, image)


def test_default_lmdeploy_image_has_a_flag_list(
    upstream: Upstream, chart: dict[str, list[Obj]]
) -> None:
    files = upstream.engines["lmdeploy"]["flags_files"]
    chart_image = chart_default_images(chart).get("RLHF_DEFAULT_LMDEPLOY_IMAGE", "(not set)")
    for image in (api.DEFAULT_LMDEPLOY_IMAGE, chart_image):
        version = version_of(image)
        assert version is not None and dotted(version) in files, (image, sorted(files))


def exported(name: str, kind: str, declared: set[str]) -> bool:
    """Whether a series name is exported by code declaring `declared` (prometheus_client adds
    `_total` to a counter's name when the declaration lacks it)."""
    if kind == "counter":
        return name.endswith("_total") and (name in declared or name[: -len("_total")] in declared)
    return name in declared


def test_engine_metrics_exist_upstream(upstream: Upstream) -> None:
    """Each vLLM and lmdeploy series the chart's alerts and dashboard may use
    (files/engine-metrics.txt) is exported by vLLM 0.32.0 and by every lmdeploy release with
    a list (v0.10.1 and v0.16.0)."""
    engines = upstream.engines
    lists = {"vllm": [upstream.lines(engines["vllm"]["metrics_file"])]}
    lists["lmdeploy"] = [upstream.lines(f) for f in engines["lmdeploy"]["metrics_files"].values()]
    missing = []
    for line in ENGINE_METRICS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind = line.split()
        engine = name.split(":", 1)[0]
        for declared in lists.get(engine, []):
            if not exported(name, kind, declared):
                missing.append(f"{name} ({kind})")
    assert not missing, missing
