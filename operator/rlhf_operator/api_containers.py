"""Container-level parts of the spec: resources, and the multi-turn environment server a
grpo stage plays against (with its env vars). Re-exported by api.py, the module callers import
them from.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from rlhf_trainer.config import ApiModel, EpisodeOptions, field_error

Quantity = Annotated[int | str, Field(description="A Kubernetes quantity, e.g. 4, 500m or 16Gi.")]


class ResourceRequirements(ApiModel):
    """Container resources, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


ENV_SERVER_PORT_VAR = "PORT"  # the container env var holding `environment.port`


class EnvVar(ApiModel):
    """An environment variable of a container, as in a Pod spec (a plain value: secrets go in
    the image or a mounted volume, never in the spec)."""

    name: str = Field(
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256, description="Variable name."
    )
    value: str = Field(
        default="",
        description="Its value; `$(VAR)` names an earlier variable (PORT among them), as in a "
        "Pod spec.",
    )


# Server settings with no server: what `url` excludes, with the value that means unset.
URL_EXCLUDES: tuple[tuple[str, Any], ...] = (
    ("image", None),
    ("command", None),
    ("args", None),
    ("port", 8000),
    ("replicas", 1),
    ("resources", ResourceRequirements()),
    ("env", []),
)


class Environment(EpisodeOptions):
    """A multi-turn environment of a grpo stage: an HTTP + JSON server (`GET /health`,
    `POST /reset`, `POST /step`) the trainer plays episodes against.

    Either `url`, for one that already runs, or a server the operator runs for as long as the
    stage runs: one Deployment and Service per replica, like the rollout servers. `$(PORT)` in
    command and args is the port.
    """

    url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/]+",
        description="Base URL of an environment server that already runs (then image, "
        "command, args, port, replicas, resources and env do not apply).",
    )
    image: str | None = Field(
        default=None,
        description="Server image; unset: spec.trainer.image, whose `rlhf env serve NAME "
        "--port $(PORT)` serves the project's environments.",
    )
    command: list[str] | None = Field(
        default=None,
        description="Container command (the image's entrypoint when unset); `rlhf run` runs "
        "it as a local process, so a local run needs it.",
    )
    args: list[str] | None = Field(default=None, description="Arguments of the command.")
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        description="Port the server listens on (container port `http`; env PORT holds it).",
    )
    replicas: int = Field(
        default=1, ge=1, le=64, description="Server replicas; an episode stays on one."
    )
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    env: list[EnvVar] = Field(
        default_factory=list, max_length=64, description="Extra environment variables."
    )

    @model_validator(mode="after")
    def _one_way(self) -> Environment:
        if self.url is not None:
            for field, unset in URL_EXCLUDES:
                if getattr(self, field) != unset:
                    raise field_error(
                        field,
                        f"`url` names an environment server that already runs, so {field} "
                        f"does not apply; remove {field}, or remove url to have the operator "
                        "run the server",
                    )
        elif self.command is None and self.image is None:
            raise ValueError(
                "set `url` (an environment server that already runs) or `command` and/or "
                "`image` (a server the operator runs; with no image spec.trainer.image runs "
                "the command, e.g. [rlhf, env, serve, NAME, --port, $(PORT)])"
            )
        names = [e.name for e in self.env]
        if ENV_SERVER_PORT_VAR in names:
            raise field_error("env", "PORT is set to `port` by the operator; set port instead")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise field_error("env", f"{', '.join(twice)} set more than once; keep one of each")
        return self
