"""Generate docs/API.md, the field reference, from the typed model (checked by a drift test)."""

from __future__ import annotations

from typing import Any

from rlhf_operator import crd


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _limits(node: dict[str, Any]) -> str:
    parts = []
    if "minimum" in node:
        parts.append(("> " if node.get("exclusiveMinimum") else "≥ ") + str(node["minimum"]))
    if "maximum" in node:
        parts.append(("< " if node.get("exclusiveMaximum") else "≤ ") + str(node["maximum"]))
    if "maxLength" in node:
        parts.append(f"≤ {node['maxLength']} chars")
    return ", ".join(parts)


def _rows(node: dict[str, Any], prefix: str, required: set[str]) -> list[str]:
    rows = []
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        default = child.get("default")
        cells = [
            f"`{path}`",
            _type(child),
            "yes" if name in required else "",
            "" if default in (None, {}, []) else f"`{default}`",
            _limits(child),
            str(child.get("description", "")).replace("\n", " ").replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
        inner = child.get("items", child) if child.get("type") == "array" else child
        suffix = "[]" if child.get("type") == "array" else ""
        rows.extend(_rows(inner, path + suffix, set(inner.get("required", []))))
    return rows


def render() -> str:
    schema = crd.spec_schema()
    lines = [
        "# RLHFRun API reference (rlhf.dev/v1alpha1)",
        "",
        "Generated from the typed model by `make docs`; a test fails when it drifts.",
        "Relative paths are relative to the workspace (/workspace in a pod, --workdir locally).",
        "",
        "| field | type | required | default | limits | description |",
        "|---|---|---|---|---|---|",
        *_rows(schema, "spec", set(schema.get("required", []))),
        "",
    ]
    return "\n".join(lines)
