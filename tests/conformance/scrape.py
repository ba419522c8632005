"""Which addresses a PodMonitor makes Prometheus scrape on a pod, worked out as they are.

- Prometheus' Kubernetes service discovery, role `pod`, makes one target per declared container
  port (`__address__` = `<pod IP>:<port>`, with `__meta_kubernetes_pod_container_port_name` and
  `_number`), and one port-free target per container that declares none (`__address__` = the pod
  IP), for relabeling to give a port. Every pod label `k` becomes
  `__meta_kubernetes_pod_label_<k with [^a-zA-Z0-9_] as _>` (and `_labelpresent_`).
- prometheus-operator (v0.93) turns a `podMetricsEndpoints` entry into a scrape config that
  first keeps the pods its selector matches, then, for `port: <name>`, keeps only targets whose
  container port has that name ("If the pod doesn't expose a port with the same name, it will
  result in no targets being discovered"; `portNumber` likewise keeps declared ports only), and
  then applies the entry's `relabelings` in order.

Labels the cluster adds to a TrainJob's pods, which the rendered objects do not show: JobSet's
`jobset.sigs.k8s.io/jobset-name` (the TrainJob's name), `jobset.sigs.k8s.io/replicatedjob-name`
and `jobset.sigs.k8s.io/job-index` (kubernetes-sigs/jobset, api/jobset/v1alpha2), and the Job
controller's `batch.kubernetes.io/job-completion-index` on pods of Indexed Jobs (Kubernetes 1.28+).
Rank 0 of a TrainJob is replicated job index 0, completion index 0.
"""

from __future__ import annotations

import re
from typing import Any

Obj = dict[str, Any]
POD_IP = "10.0.0.7"


def _meta(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discover(pod: Obj) -> list[dict[str, str]]:
    """The targets Prometheus' pod role discovers on one pod (its containers only)."""
    labels: dict[str, str] = (pod.get("metadata") or {}).get("labels") or {}
    base = {"__meta_kubernetes_pod_ip": POD_IP}
    for key, value in labels.items():
        base[f"__meta_kubernetes_pod_label_{_meta(key)}"] = value
        base[f"__meta_kubernetes_pod_labelpresent_{_meta(key)}"] = "true"
    out = []
    for container in (pod.get("spec") or {}).get("containers", []):
        one = {**base, "__meta_kubernetes_pod_container_name": container["name"]}
        ports = container.get("ports") or []
        for port in ports:
            out.append({
                **one,
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                "__address__": f"{POD_IP}:{port['containerPort']}",
            })
        if not ports:
            out.append({**one, "__address__": POD_IP})
    return out


def _replacement(template: str) -> str:
    """Prometheus' `$1` / `${1}` references as Python's `\\g<1>`."""
    return re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", template)


def relabel(target: dict[str, str], rule: Obj) -> dict[str, str] | None:
    """One relabel_config (keep, drop, replace, lowercase, uppercase); None: dropped."""
    action = str(rule.get("action", "replace")).lower()
    value = rule.get("separator", ";").join(target.get(s, "") for s in rule.get("sourceLabels", []))
    pattern = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
    match = pattern.match(value)
    if action == "keep":
        return target if match else None
    if action == "drop":
        return None if match else target
    out = dict(target)
    if action == "replace":
        if match:
            out[rule["targetLabel"]] = match.expand(_replacement(rule.get("replacement", "$1")))
        return out
    if action in ("lowercase", "uppercase"):
        out[rule["targetLabel"]] = value.lower() if action == "lowercase" else value.upper()
        return out
    raise AssertionError(f"relabel action {action!r} is not simulated here")


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def scraped(pod: Obj, monitors: list[Obj]) -> list[tuple[str, str, str]]:
    """(PodMonitor, path, address) of every target the monitors make Prometheus scrape."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    out = []
    for monitor in monitors:
        if not selects(monitor["spec"].get("selector") or {}, labels):
            continue
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for target in discover(pod):
                kept: dict[str, str] | None = target
                if "port" in endpoint:
                    name = target.get("__meta_kubernetes_pod_container_port_name")
                    kept = target if name == endpoint["port"] else None
                elif "portNumber" in endpoint:
                    number = target.get("__meta_kubernetes_pod_container_port_number")
                    kept = target if number == str(endpoint["portNumber"]) else None
                for rule in endpoint.get("relabelings") or []:
                    kept = relabel(kept, rule) if kept is not None else None
                if kept is not None:
                    path = endpoint.get("path", "/metrics")
                    out.append((monitor["metadata"]["name"], path, kept["__address__"]))
    return out


def trainjob_rank0_labels(job: Obj, replicated_job: str) -> dict[str, str]:
    """The labels JobSet and the Job controller add to rank 0's pod of a TrainJob."""
    return {
        "jobset.sigs.k8s.io/jobset-name": job["metadata"]["name"],
        "jobset.sigs.k8s.io/replicatedjob-name": replicated_job,
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-completion-index": "0",
    }
