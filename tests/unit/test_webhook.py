"""The validating webhook refuses what `rlhf validate` refuses, at the path the chart calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_generate, manifest
from rlhf_operator import controller
from rlhf_operator.reconcile import Reconciler

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_valid_run_is_admitted() -> None:
    assert controller.admission_problems(manifest()) == []


def test_bad_runs_are_refused_naming_the_field() -> None:
    doc = manifest()
    doc["spec"]["stages"][1]["from"] = "nope"
    doc["spec"]["stages"][0]["hyperparameters"] = {"learningRate": -1}
    problems = controller.admission_problems(doc)
    assert any("spec.stages[0].hyperparameters.learningRate" in p for p in problems)


def test_webhook_id_matches_the_chart_path() -> None:
    generate = load_generate()
    values = {"webhook": {"enabled": True, "certManager": {"enabled": True}}}
    rendered = generate.render_chart(values, name="rlhf", namespace="rlhf")
    [config] = [d for docs in rendered.values() for d in docs
                if d["kind"] == "ValidatingWebhookConfiguration"]
    paths = [w["clientConfig"]["service"]["path"] for w in config["webhooks"]]
    assert paths == [f"/{controller.WEBHOOK_ID}"]
    server = controller.webhook_server({"RLHF_WEBHOOK_PORT": "9443"})
    reconciler = controller.Controller(Reconciler.__new__(Reconciler))
    registry = controller.build_registry(reconciler, webhook=server)
    ids = [h.id for h in registry._webhooks.get_all_handlers()]
    assert controller.WEBHOOK_ID in ids
    without = controller.build_registry(reconciler)
    assert [h.id for h in without._webhooks.get_all_handlers()] == []


def test_webhook_server_only_when_enabled() -> None:
    assert controller.webhook_server({}) is None
    server = controller.webhook_server({"RLHF_WEBHOOK_PORT": "9443",
                                        "RLHF_WEBHOOK_CERT_DIR": "/certs"})
    assert server is not None and server.port == 9443
    assert str(server.certfile) == "/certs/tls.crt" and str(server.pkeyfile) == "/certs/tls.key"


def test_chart_sets_the_env_the_operator_reads() -> None:
    text = (ROOT / "charts" / "rlhf-operator" / "templates" / "deployment.yaml").read_text()
    for name in ("RLHF_WEBHOOK_PORT", "RLHF_WEBHOOK_CERT_DIR"):
        assert name in text
