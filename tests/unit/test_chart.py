"""The Helm chart, rendered by the Helm SDK under several values scenarios.

Every rendered object is checked against the upstream Kubernetes schemas (kubernetes-validate);
the CRD-based kinds it lacks (Prometheus operator, cert-manager) against envelopes written here
from their Go API types. The chart's CRD must equal manifests/crds, and the kustomize base in
manifests/base must equal a fresh render.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import load_generate
from rlhf_operator import api, builders

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rlhf-operator"
K8S_VERSION = "1.34"
NAMESPACE = "rlhf-system"
Obj = dict[str, Any]


generate = load_generate()

CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()
SCENARIOS: dict[str, Obj] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "monitoring": {
            "labels": {"release": "kube-prometheus-stack"},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True, "namespace": "grafana"},
        }
    },
    "servicemonitor": {
        "monitoring": {"podMonitor": {"enabled": True, "operator": False},
                       "serviceMonitor": {"enabled": True}}
    },
    "webhook-cert-manager": {"webhook": {"enabled": True, "certManager": {"enabled": True}}},
    "webhook-own-secret": {
        "webhook": {"enabled": True, "tlsSecretName": "rlhf-webhook-tls", "caBundle": CA}
    },
    "crds-disabled": {"crds": {"enabled": False}},
    "crds-not-kept": {"crds": {"keep": False}},
    "everything-namespaced": {
        "watchNamespaces": ["team-a"],
        "fullnameOverride": "rlhf",
        "serviceAccount": {"name": "rlhf-sa", "annotations": {"iam.example.com/role": "rlhf"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "extraArgs": ["--verbose"],
            "extraEnv": [{"name": "RLHF_LOG_FORMAT", "value": "json"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"example.com/team": "ml"},
        },
        "webhook": {"enabled": True, "certManager": {"enabled": True}},
        "monitoring": {
            "podMonitor": {"enabled": True, "interval": "15s"},
            "prometheusRule": {"enabled": True, "klThreshold": 0.5},
            "dashboard": {"enabled": True},
        },
    },
}


def render(values: Obj | None = None, name: str = "rlhf-operator") -> list[Obj]:
    per_template = generate.render_chart(values or {}, name=name, namespace=NAMESPACE)
    return [doc for docs in per_template.values() for doc in docs]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


# Envelopes of the CRD-based kinds, written from their Go API types:
# prometheus-operator pkg/apis/monitoring/v1 (PodMonitorSpec, ServiceMonitorSpec, Endpoint,
# RelabelConfig, PrometheusRuleSpec, RuleGroup, Rule) and cert-manager pkg/apis/certmanager/v1
# (CertificateSpec, IssuerSpec). Closed where the chart writes, so a typo fails.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
            r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
STRINGS = {"type": "array", "items": {"type": "string"}}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": STRINGS,
                },
            },
        },
    },
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
}
RELABEL = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "sourceLabels": {
                "type": "array",
                "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
            },
            "separator": {"type": "string"},
            "targetLabel": {"type": "string"},
            "regex": {"type": "string"},
            "modulus": {"type": "integer"},
            "replacement": {"type": "string"},
            "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop",
                                "hashmod", "HashMod", "labelmap", "LabelMap", "labeldrop",
                                "LabelDrop", "labelkeep", "LabelKeep", "lowercase",
                                "Lowercase", "uppercase", "Uppercase", "keepequal",
                                "KeepEqual", "dropequal", "DropEqual"]},
        },
    },
}
SCRAPE_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "relabelings": RELABEL,
        "metricRelabelings": RELABEL,
        "tlsConfig": {"type": "object"},
        "filterRunning": {"type": "boolean"},
    },
}


def _monitor(spec_props: Obj, required: list[str]) -> Obj:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": required,
                "properties": spec_props,
            },
        },
    }


RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}
CERT_MANAGER_ENVELOPE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "Certificate"]},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object"},
    },
}
ENVELOPES: dict[str, Obj] = {
    "PodMonitor": _monitor(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": SCRAPE_ENDPOINT},
            "jobLabel": {"type": "string"},
            "podTargetLabels": STRINGS,
        },
        ["selector", "podMetricsEndpoints"],
    ),
    "ServiceMonitor": _monitor(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": NAMESPACE_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": SCRAPE_ENDPOINT},
            "jobLabel": {"type": "string"},
            "targetLabels": STRINGS,
        },
        ["selector", "endpoints"],
    ),
    "PrometheusRule": _monitor(
        {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "labels": STRING_MAP,
                        "rules": {"type": "array", "items": RULE},
                    },
                },
            }
        },
        ["groups"],
    ),
    "Issuer": {
        **CERT_MANAGER_ENVELOPE,
        "properties": {
            **CERT_MANAGER_ENVELOPE["properties"],
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "minProperties": 1,
                "maxProperties": 1,
                "properties": {k: {"type": "object"}
                               for k in ("selfSigned", "ca", "vault", "venafi", "acme")},
            },
        },
    },
    "Certificate": {
        **CERT_MANAGER_ENVELOPE,
        "properties": {
            **CERT_MANAGER_ENVELOPE["properties"],
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string"},
                    "commonName": {"type": "string"},
                    "dnsNames": STRINGS,
                    "duration": {"type": "string"},
                    "renewBefore": {"type": "string"},
                    "isCA": {"type": "boolean"},
                    "usages": STRINGS,
                    "issuerRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                       "group": {"type": "string"}},
                    },
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                        },
                    },
                },
            },
        },
    },
}


def validate(obj: Obj) -> None:
    envelope = ENVELOPES.get(obj["kind"])
    if envelope is not None:
        jsonschema.validate(obj, envelope)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_object_validates(scenario: str) -> None:
    objs = render(SCENARIOS[scenario])
    assert objs
    for obj in objs:
        validate(obj)


def test_envelopes_catch_typos() -> None:
    objs = render(SCENARIOS["monitoring"] | SCENARIOS["webhook-cert-manager"])
    broken = copy.deepcopy(one(objs, "PodMonitor", "rlhf-operator-trainers"))
    broken["spec"]["podMetricsEndpoints"][0]["relabelling"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(one(objs, "PrometheusRule"))
    broken["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(one(objs, "Certificate"))
    broken["spec"]["dnsName"] = broken["spec"].pop("dnsNames")
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_reports_no_errors_or_warnings(scenario: str) -> None:
    report = helm_python.lint(
        CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version="v1.34.0"
    )
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_chart_crd_equals_the_generated_crd() -> None:
    committed = ROOT / "manifests" / "crds" / "rlhf.dev_rlhfruns.yaml"
    copy_in_chart = CHART / "files" / "crds" / committed.name
    assert copy_in_chart.read_bytes() == committed.read_bytes(), (
        "the chart's CRD copy is stale: run `python manifests/generate.py`"
    )
    rendered = one(render(), "CustomResourceDefinition")
    metadata = rendered["metadata"]
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert metadata.pop("labels")["app.kubernetes.io/part-of"] == "rlhf-operator"
    assert rendered == yaml.safe_load(committed.read_text())


def test_crds_are_gated_and_kept() -> None:
    assert find(render(SCENARIOS["crds-disabled"]), "CustomResourceDefinition") == []
    crd = one(render(SCENARIOS["crds-not-kept"]), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def test_kustomize_base_equals_a_fresh_render() -> None:
    assert generate.stale(generate.crd_files(), generate.CHART_CRDS, "*.yaml") == []
    assert generate.stale(generate.base_files(), generate.BASE, "*.yaml") == [], (
        "manifests/base is stale: run `python manifests/generate.py`"
    )
    kustomization = yaml.safe_load((generate.BASE / "kustomization.yaml").read_text())
    files = {p.name for p in generate.BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    for name in files:
        for obj in yaml.safe_load_all((generate.BASE / name).read_text()):
            assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
            assert "helm.sh/chart" not in obj["metadata"].get("labels", {})
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_operator_deployment() -> None:
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    assert container["command"] == ["rlhf"]
    assert container["args"] == [
        "operator", "--standalone", "--liveness", "http://0.0.0.0:8081/healthz", "--all-namespaces"
    ]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def env_of(objs: list[Obj]) -> dict[str, Any]:
    [container] = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_default_images_are_the_operators_own() -> None:
    env = env_of(render())
    assert env["RLHF_DEFAULT_TRAINER_IMAGE"] == api.DEFAULT_TRAINER_IMAGE
    assert env["RLHF_DEFAULT_VLLM_IMAGE"] == api.DEFAULT_VLLM_IMAGE
    assert env["RLHF_DEFAULT_LMDEPLOY_IMAGE"] == api.DEFAULT_LMDEPLOY_IMAGE
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for kind in ("trainer", "vllm", "lmdeploy"):
        resources = json.loads(env[f"RLHF_DEFAULT_{kind.upper()}_RESOURCES"])
        assert resources == values["defaults"][kind]["resources"]
        api.ResourceRequirements.model_validate(resources)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/rlhf-operator/operator:{chart['appVersion']}"


def test_overridden_images_reach_the_operator() -> None:
    values = {"defaults": {"vllm": {"image": {"repository": "mirror/vllm", "tag": "v9"}}},
              "image": {"tag": "dev"}}
    objs = render(values)
    assert env_of(objs)["RLHF_DEFAULT_VLLM_IMAGE"] == "mirror/vllm:v9"
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "ghcr.io/rlhf-operator/operator:dev"
    )


def rbac_rules() -> list[Obj]:
    return list(yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text()))


def plain(rule: Obj) -> Obj:
    return {k: v for k, v in rule.items() if k not in ("clusterScoped", "namespacedModeOnly")}


def test_cluster_wide_rbac_is_one_clusterrole_from_the_list() -> None:
    objs = render()
    assert find(objs, "Role") == [] and find(objs, "RoleBinding") == []
    role = one(objs, "ClusterRole")
    assert role["rules"] == [plain(r) for r in rbac_rules() if not r.get("namespacedModeOnly")]
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = one(objs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_namespaced_rbac_is_a_role_per_watched_namespace() -> None:
    objs = render(SCENARIOS["namespaced"])
    roles = find(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    namespaced = [plain(r) for r in rbac_rules() if not r.get("clusterScoped")]
    cluster = [plain(r) for r in rbac_rules() if r.get("clusterScoped")]
    for role in roles:
        assert role["rules"] == namespaced
    assert one(objs, "ClusterRole")["rules"] == cluster
    bindings = find(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    [container] = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][-4:] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert "--all-namespaces" not in container["args"]


def test_rbac_lets_the_operator_block_owner_deletion() -> None:
    """Children's ownerReferences set blockOwnerDeletion, which the
    OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default) allows only
    to a user who may update the owner's finalizers: in the ClusterRole, or in each Role."""
    finalizers = {"apiGroups": ["rlhf.dev"], "resources": ["rlhfruns/finalizers"],
                  "verbs": ["update"]}
    assert finalizers in one(render(), "ClusterRole")["rules"]
    roles = find(render(SCENARIOS["namespaced"]), "Role")
    assert roles and all(finalizers in role["rules"] for role in roles)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_has_no_wildcards(scenario: str) -> None:
    for obj in render(SCENARIOS[scenario]):
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{obj['kind']}: wildcard {key} in {rule}"
            assert "nonResourceURLs" not in rule


def test_rbac_can_be_left_out() -> None:
    objs = render({"rbac": {"create": False}, "serviceAccount": {"create": False,
                                                                  "name": "existing"}})
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                        "ServiceAccount"}
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"


def test_webhook_with_cert_manager() -> None:
    objs = render(SCENARIOS["webhook-cert-manager"])
    config = one(objs, "ValidatingWebhookConfiguration")
    [hook] = config["webhooks"]
    service = hook["clientConfig"]["service"]
    assert service == {"name": "rlhf-operator-webhook", "namespace": NAMESPACE,
                       "path": "/validate-rlhfrun", "port": 443}
    assert hook["rules"][0]["resources"] == ["rlhfruns"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    certificate = one(objs, "Certificate")
    assert config["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/{certificate['metadata']['name']}"
    }
    assert "rlhf-operator-webhook.rlhf-system.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"] == one(objs, "Issuer")["metadata"]["name"]
    assert one(objs, "Service", "rlhf-operator-webhook")["spec"]["ports"][0]["targetPort"] == (
        "webhook"
    )
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
    env = env_of(objs)
    assert env["RLHF_WEBHOOK_PORT"] == "9443"
    assert env["RLHF_WEBHOOK_CERT_DIR"] == "/etc/rlhf/webhook-tls"


def test_webhook_with_own_secret() -> None:
    objs = render(SCENARIOS["webhook-own-secret"])
    assert find(objs, "Certificate") == [] and find(objs, "Issuer") == []
    [hook] = one(objs, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == CA
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    tls = next(v for v in pod["volumes"] if v["name"] == "webhook-tls")
    assert tls["secret"]["secretName"] == "rlhf-webhook-tls"


def test_webhook_only_watches_watched_namespaces() -> None:
    values = SCENARIOS["namespaced"] | SCENARIOS["webhook-cert-manager"]
    [hook] = one(render(values), "ValidatingWebhookConfiguration")["webhooks"]
    [expression] = hook["namespaceSelector"]["matchExpressions"]
    assert expression["values"] == ["team-a", "team-b"]


def test_monitoring_objects() -> None:
    objs = render(SCENARIOS["monitoring"])
    monitors = {m["metadata"]["name"]: m for m in find(objs, "PodMonitor")}
    assert set(monitors) == {"rlhf-operator", "rlhf-operator-trainers",
                             "rlhf-operator-trainjob-trainers", "rlhf-operator-servers",
                             "rlhf-operator-environments"}
    for monitor in monitors.values():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    trainers = monitors["rlhf-operator-trainers"]["spec"]
    assert trainers["selector"] == {"matchLabels": {"rlhf.dev/component": "trainer"}}
    assert trainers["namespaceSelector"] == {"any": True}
    [endpoint] = trainers["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["run"] == ["__meta_kubernetes_pod_label_rlhf_dev_run"]
    assert relabel["stage"] == ["__meta_kubernetes_pod_label_rlhf_dev_stage"]
    # TrainJob pods declare no port (runtimePatches cannot): rank 0 is kept by its completion
    # index and container, and addressed on the port the builders give RLHF_METRICS_PORT.
    trainjob = monitors["rlhf-operator-trainjob-trainers"]["spec"]
    [endpoint] = trainjob["podMetricsEndpoints"]
    assert "port" not in endpoint
    keep = {r["sourceLabels"][0]: r["regex"] for r in endpoint["relabelings"]
            if r.get("action") == "keep"}  # fmt: skip
    assert keep == {
        "__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index": "0",
        "__meta_kubernetes_pod_container_name": "node",
    }
    [address] = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "__address__"]
    assert address["replacement"] == f"$1:{builders.METRICS_PORT}"
    servers = monitors["rlhf-operator-servers"]["spec"]
    assert servers["podMetricsEndpoints"][0]["port"] == "http"
    [expression] = servers["selector"]["matchExpressions"]
    assert expression == {"key": "rlhf.dev/component", "operator": "In",
                          "values": ["rollout", "judge"]}
    environments = monitors["rlhf-operator-environments"]["spec"]
    assert environments["selector"] == {"matchLabels": {"rlhf.dev/component": "environment"}}
    [endpoint] = environments["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    without = render({"monitoring": {"podMonitor": {"enabled": True, "environments": False}}})
    assert "rlhf-operator-environments" not in {m["metadata"]["name"]
                                                for m in find(without, "PodMonitor")}
    assert monitors["rlhf-operator"]["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    dashboard = one(objs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "grafana"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["rlhf-operator.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text()
    )
    assert find(render(), "PodMonitor") == [] and find(render(), "PrometheusRule") == []


def test_service_monitor_replaces_the_operator_pod_monitor() -> None:
    objs = render(SCENARIOS["servicemonitor"])
    assert {m["metadata"]["name"] for m in find(objs, "PodMonitor")} == {
        "rlhf-operator-trainers", "rlhf-operator-trainjob-trainers", "rlhf-operator-servers",
        "rlhf-operator-environments",
    }
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service", "rlhf-operator-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_namespaced_monitors_select_watched_namespaces() -> None:
    values = SCENARIOS["namespaced"] | SCENARIOS["monitoring"]
    for monitor in find(render(values), "PodMonitor"):
        if monitor["metadata"]["name"] != "rlhf-operator":
            assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


CONTRADICTIONS = {
    "webhook-without-tls": (
        {"webhook": {"enabled": True}},
        "webhook.enabled needs TLS for the webhook server",
    ),
    "webhook-two-certificates": (
        {"webhook": {"enabled": True, "certManager": {"enabled": True},
                     "tlsSecretName": "x", "caBundle": CA}},
        "set only one of them",
    ),
    "secret-without-ca": (
        {"webhook": {"enabled": True, "tlsSecretName": "x"}},
        "webhook.tlsSecretName needs webhook.caBundle",
    ),
    "certificates-without-webhook": (
        {"webhook": {"certManager": {"enabled": True}}},
        "webhook.enabled is false",
    ),
    "operator-scraped-twice": (
        {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}},
        "would both scrape the operator",
    ),
    "no-service-account": (
        {"serviceAccount": {"create": False}},
        "serviceAccount.create=false needs serviceAccount.name",
    ),
    "namespace-twice": (
        {"watchNamespaces": ["team-a", "team-a"]},
        "watchNamespaces lists a namespace more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictory_values_fail_with_a_message(case: str) -> None:
    values, message = CONTRADICTIONS[case]
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": 2}, "additional properties 'replicaCount'"),
        ({"crds": {"enabled": "yes"}}, "/crds/enabled"),
        ({"webhook": {"failurePolicy": "Sometimes"}}, "/webhook/failurePolicy"),
        ({"monitoring": {"prometheusRule": {"klFor": "ten minutes"}}},
         "/monitoring/prometheusRule/klFor"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"defaults": {"trainer": {"image": {"repository": ""}}}},
         "/defaults/trainer/image/repository"),
    ],
)
def test_schema_refuses_bad_values(values: Obj, where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        render(values)


def schema_leaves(node: Obj, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of every values key the schema types, down to free-form maps and lists."""
    out: list[tuple[str, ...]] = []
    for key, child in node.get("properties", {}).items():
        out.append((*path, key))
        out.extend(schema_leaves(child, (*path, key)))
    return out


def values_comments() -> dict[tuple[str, ...], bool]:
    """Each key path in values.yaml, and whether a comment line sits right above it."""
    out: dict[tuple[str, ...], bool] = {}
    stack: list[tuple[int, str]] = []
    previous = ""
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*):", line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match.group(2)))
            out[tuple(k for _, k in stack)] = previous.lstrip().startswith("#")
        if line.strip():
            previous = line
    return out


def test_values_schema_is_closed_and_typed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False

    def check(node: Obj, path: str) -> None:
        assert "type" in node, f"{path} has no type"
        assert node.get("description"), f"{path} has no description"
        for key, child in node.get("properties", {}).items():
            check(child, f"{path}.{key}")
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} is not closed"

    for key, child in schema["properties"].items():
        check(child, key)


def data_paths(schema: Obj) -> set[tuple[str, ...]]:
    """Schema paths whose values are data, not keys: maps, lists and free-form objects."""
    out: set[tuple[str, ...]] = set()

    def walk(node: Obj, path: tuple[str, ...]) -> None:
        for key, child in node.get("properties", {}).items():
            if key == "resources":  # a Kubernetes ResourceRequirements, documented upstream
                out.add((*path, key))
            elif "properties" in child:
                walk(child, (*path, key))
            elif child.get("type") in ("object", "array"):
                out.add((*path, key))

    walk(schema, ())
    return out


def test_every_values_key_is_typed_and_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    data = data_paths(schema)
    typed = {
        p for p in schema_leaves(schema)
        if p[0] != "global" and not any(p[: len(d)] == d and p != d for d in data)
    }
    documented = values_comments()
    missing = sorted(".".join(p) for p in typed if p not in documented)
    assert missing == [], f"keys typed in values.schema.json but absent from values.yaml: {missing}"
    untyped = sorted(
        ".".join(p) for p in documented
        if p not in typed and not any(p[: len(d)] == d for d in data)
    )
    assert untyped == [], f"values.yaml keys missing from values.schema.json: {untyped}"
    groups = {p[:i] for p in typed for i in range(1, len(p))}
    undocumented = sorted(".".join(p) for p in typed if p not in groups and not documented[p])
    assert undocumented == [], f"values keys without a comment above them: {undocumented}"


def test_install_doc_lists_every_values_key() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    data = data_paths(schema)
    typed = {
        ".".join(p) for p in schema_leaves(schema)
        if p[0] != "global" and not any(p[: len(d)] == d and p != d for d in data)
    }
    groups = {k.rsplit(".", i)[0] for k in typed for i in range(1, k.count(".") + 1)}
    table = set(re.findall(r"^\| `([a-z][\w.]*)` \|", (ROOT / "docs" / "INSTALL.md").read_text(),
                           re.MULTILINE))
    assert table == typed - groups


def test_notes_render() -> None:
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render({}, name="rlhf-operator", namespace=NAMESPACE)[
            "rlhf-operator/templates/NOTES.txt"
        ]
    assert "rollout status deployment/rlhf-operator" in notes
    assert "every namespace" in notes
