"""The conformance checker: rendered objects against upstream CRD schemas and conventions.

The upstream folder (`RLHF_UPSTREAM`, default ../shared/upstream; see its README.md) holds
verbatim upstream CRDs, flag and metric lists, and `conventions.json`, which names every file
the checker reads. Nothing from it is copied into the repository.

Custom resources are checked the way an API server with `fieldValidation=Strict` checks them:

- the version's `openAPIV3Schema` becomes a JSON schema (draft 4, as OpenAPI v3.0): objects are
  closed (an unknown field is an error) unless `x-kubernetes-preserve-unknown-fields` is set;
  `x-kubernetes-int-or-string` accepts an integer or a string; `x-kubernetes-embedded-resource`
  adds apiVersion, kind and metadata; `nullable` admits null; `x-kubernetes-list-type: set` means
  unique items; `required`, `enum`, `pattern`, `maxLength`, `minimum`, `maxItems` and the rest are
  JSON Schema's own. The root `metadata` is checked as ObjectMeta (the fields the operator and the
  chart write), since the CRD leaves it to the API server.
- `x-kubernetes-list-type: map` lists may not repeat a key (`x-kubernetes-list-map-keys`).
- Every `x-kubernetes-validations` CEL rule that does not mention `oldSelf` is evaluated with
  cel-python, `self` bound to the value at the rule's node (transition rules run only on update,
  and there is no old object at creation). Among them: TrainJob's `metadata.name` rules (RFC 1035
  label, at most 63 characters), its `managedBy` and `storageUri` rules, the runtime's
  single-framework and `InOrder` startup rules. A rule that cel-python cannot evaluate is an error,
  never a pass.

Built-in kinds go to kubernetes-validate in strict mode.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml
from celpy import celtypes

Obj = dict[str, Any]

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")

# JSON Schema keywords a CRD schema node may carry, passed through unchanged.
PLAIN_KEYWORDS = frozenset({
    "type", "enum", "pattern", "format", "maxLength", "minLength", "maximum", "minimum",
    "exclusiveMaximum", "exclusiveMinimum", "multipleOf", "maxItems", "minItems", "uniqueItems",
    "maxProperties", "minProperties", "required",
})
STRING_MAP: Obj = {"type": "object", "additionalProperties": {"type": "string"}}
# ObjectMeta as far as the operator and the chart write it; the API server owns the rest.
OBJECT_META: Obj = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": {"type": "string", "minLength": 1},
                    "kind": {"type": "string", "minLength": 1},
                    "name": {"type": "string", "minLength": 1},
                    "uid": {"type": "string", "minLength": 1},
                    "controller": {"type": "boolean"},
                    "blockOwnerDeletion": {"type": "boolean"},
                },
            },
        },
    },
}


# The oldest Kubernetes the install guide supports (CEL rules with reason and fieldPath) and the
# newest kubernetes-validate knows: built-in kinds must validate against both.
K8S_VERSIONS = ("1.30", ".".join(kubernetes_validate.latest_version().split(".")[:2]))


class UpstreamMissing(Exception):
    """The upstream folder, conventions.json, or a file it names, is not there."""


def version_of(text: str) -> tuple[int, int, int] | None:
    """`v0.10.1`, `0.32.0` or an image reference's tag, as a tuple; None if it has none."""
    tag = text.rsplit(":", 1)[-1] if "/" in text or ":" in text else text
    match = VERSION.match(tag)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def to_json_schema(node: Obj) -> Obj:
    """A CRD (structural OpenAPI v3) schema node as a closed JSON schema; see the module doc."""
    out: Obj = {k: copy.deepcopy(v) for k, v in node.items() if k in PLAIN_KEYWORDS}
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        out["additionalProperties"] = to_json_schema(extra)
    elif isinstance(extra, bool):
        out["additionalProperties"] = extra
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(s) for s in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = copy.deepcopy(OBJECT_META)
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    is_object = node.get("type") == "object" or "properties" in node
    open_object = node.get("x-kubernetes-preserve-unknown-fields")
    if is_object and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _index_of(items: celtypes.ListType, value: Any) -> celtypes.IntType:
    """Kubernetes' CEL list library `indexOf`, which cel-python lacks."""
    return celtypes.IntType(next((i for i, item in enumerate(items) if item == value), -1))


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions={"indexOf": _index_of})


def evaluated_rule(rule: str) -> bool:
    """Whether the checker evaluates a rule: all but transition rules (`oldSelf`)."""
    return "oldSelf" not in rule


def structural_problems(schema: Obj, value: Any, path: str = "") -> list[str]:
    """CEL rules and list-map keys along `value`, each at its schema node."""
    problems: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not evaluated_rule(rule["rule"]):
            continue
        try:
            ok = bool(_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}))
        except Exception as err:  # cel-python's errors share no base class
            problems.append(f"{path or '.'}: CEL rule {rule['rule']!r} not evaluable: {err}")
            continue
        if not ok:
            why = rule.get("message") or rule.get("messageExpression") or "failed"
            problems.append(f"{path or '.'}: {why} (CEL rule {rule['rule']!r})")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                problems.extend(structural_problems(sub, child, f"{path}.{key}"))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = [tuple(json.dumps(i.get(k)) for k in keys) for i in value]
            if len(seen) != len(set(seen)):
                problems.append(f"{path}: duplicate list-map keys {keys}: {seen}")
        for i, item in enumerate(value):
            problems.extend(structural_problems(schema["items"], item, f"{path}[{i}]"))
    return problems


def _error_path(err: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)


@dataclass
class CrdSchema:
    """One served version of an upstream CRD: its raw schema and a compiled validator."""

    key: str
    source: str
    raw: Obj
    validator: jsonschema.Draft4Validator = field(repr=False)

    def problems(self, obj: Obj) -> list[str]:
        found = [
            f"{_error_path(e) or '.'}: {e.message[:300]}"
            for e in sorted(self.validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        ]
        return found + structural_problems(self.raw, obj)


def load_crd(path: Path, api_version: str, kind: str, source: str) -> CrdSchema:
    """The schema of `kind` at `api_version` from a CRD file, ready to validate objects."""
    group, version = api_version.split("/")
    docs = [d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d]
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == group and names["kind"] == kind, f"{path}: not {kind}"
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{path}: {api_version} is not a served version of {kind}"
    raw = served[0]["schema"]["openAPIV3Schema"]
    schema = to_json_schema(raw)
    schema.setdefault("properties", {})["metadata"] = copy.deepcopy(OBJECT_META)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    props = schema["properties"]
    props["apiVersion"] = {"enum": [api_version]}
    props["kind"] = {"enum": [kind]}
    validator = jsonschema.Draft4Validator(schema)
    return CrdSchema(f"{api_version} {kind}", source, raw, validator)


def builtin_problems(obj: Obj, k8s_version: str) -> list[str]:
    """kubernetes-validate, strict: unknown fields and unknown kinds are errors."""
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:  # a jsonschema error: the first found
        return [f"Kubernetes {k8s_version}: {_error_path(err) or '.'}: {err.message[:300]}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"Kubernetes {k8s_version} has no {obj.get('apiVersion')} {obj.get('kind')}"]
    return []


def object_key(obj: Obj) -> str:
    return f"{obj.get('apiVersion')} {obj.get('kind')}"


def describe(obj: Obj) -> str:
    return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"


@dataclass
class Upstream:
    """The upstream folder: conventions.json and the files it names."""

    root: Path
    conventions: Obj
    _crds: dict[str, CrdSchema] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path) -> Upstream:
        if not root.is_dir():
            raise UpstreamMissing(
                f"upstream folder {root} not found: set RLHF_UPSTREAM, or run "
                "`make conformance UPSTREAM=DIR`, with a copy of shared/upstream"
            )
        conventions_file = root / "conventions.json"
        if not conventions_file.is_file():
            raise UpstreamMissing(f"{conventions_file} not found")
        up = cls(root, json.loads(conventions_file.read_text()))
        missing = [f for f in up.named_files() if not (root / f).is_file()]
        if missing:
            raise UpstreamMissing(f"{root}: conventions.json names missing files: {missing}")
        return up

    def named_files(self) -> list[str]:
        conv = self.conventions
        files = [s["file"] for s in conv["schemas"].values()]
        files += [s["file"] for alts in conv["compat_schemas"].values() for s in alts]
        files += [r["file"] for r in conv["runtimes"].values()]
        vllm, lmdeploy = conv["engines"]["vllm"], conv["engines"]["lmdeploy"]
        files += [vllm["flags_file"], vllm["metrics_file"]]
        files += [*lmdeploy["flags_files"].values(), *lmdeploy["metrics_files"].values()]
        return files

    def schema(self, key: str) -> CrdSchema:
        """The current upstream schema of `apiVersion Kind` (conventions.json `schemas`)."""
        if key not in self._crds:
            entry = self.conventions["schemas"][key]
            self._crds[key] = self._load(key, entry)
        return self._crds[key]

    def compat_schemas(self, key: str) -> list[CrdSchema]:
        """Older upstream schemas of a kind (conventions.json `compat_schemas`)."""
        return [self._load(key, e) for e in self.conventions["compat_schemas"].get(key, [])]

    def _load(self, key: str, entry: Obj) -> CrdSchema:
        api_version, kind = key.split(" ")
        return load_crd(self.root / entry["file"], api_version, kind, entry["upstream"])

    def is_custom(self, obj: Obj) -> bool:
        return object_key(obj) in self.conventions["schemas"]

    def problems(self, obj: Obj, k8s_versions: tuple[str, ...]) -> list[str]:
        """Every way `obj` would be refused: its upstream CRD schema, or Kubernetes' own."""
        if self.is_custom(obj):
            return self.schema(object_key(obj)).problems(obj)
        return [p for v in k8s_versions for p in builtin_problems(obj, v)]

    def runtimes(self) -> dict[str, Obj]:
        """The upstream ClusterTrainingRuntimes, by name."""
        out = {}
        for entry in self.conventions["runtimes"].values():
            doc = yaml.safe_load((self.root / entry["file"]).read_text())
            out[doc["metadata"]["name"]] = doc
        return out

    def lines(self, relative: str) -> set[str]:
        text = (self.root / relative).read_text()
        return {line.strip() for line in text.splitlines() if line.strip()}

    @property
    def kueue(self) -> Obj:
        return dict(self.conventions["kueue"])

    @property
    def engines(self) -> Obj:
        return dict(self.conventions["engines"])
