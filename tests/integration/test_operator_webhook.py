"""The validating webhook over HTTPS: `rlhf operator` with RLHF_WEBHOOK_PORT and
RLHF_WEBHOOK_CERT_DIR, as the chart runs it, answering AdmissionReviews as an API server sends
them, over TLS verified against the CA that signed its certificate."""

from __future__ import annotations

import copy
import json
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from burst import wait_for_operator
from helpers import manifest
from kube_emulator import Emulator, operator_process, wait_for
from rlhf_operator.controller import WEBHOOK_ID

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
EXAMPLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "sft-reward-ppo.yaml"


def issue_certificates(folder: Path) -> Path:
    """A CA and a serving certificate for 127.0.0.1 signed by it, as cert-manager puts them in
    the webhook's Secret (tls.crt, tls.key, ca.crt). Returns the folder."""
    now = datetime.now(UTC)

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                             x509.IPAddress(IPv4Address("127.0.0.1"))]), False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("rlhf-test-ca", ca_key, "rlhf-test-ca", ca_key, ca=True)
    cert = certificate("rlhf-operator-webhook.rlhf.svc", key, "rlhf-test-ca", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
    (folder / "tls.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Webhook:
    """An API server's side of the webhook: AdmissionReviews over verified TLS."""

    def __init__(self, port: int, cafile: Path) -> None:
        self.url = f"https://127.0.0.1:{port}/{WEBHOOK_ID}"
        self.context = ssl.create_default_context(cafile=str(cafile))

    def review(self, obj: Obj, operation: str = "CREATE", old: Obj | None = None,
               context: ssl.SSLContext | None = None) -> Obj:
        """The AdmissionReview `response` to an `operation` on `obj` (admission.k8s.io/v1)."""
        meta = obj["metadata"]
        request = {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "rlhf.dev", "version": "v1alpha1", "kind": "RLHFRun"},
            "resource": {"group": "rlhf.dev", "version": "v1alpha1", "resource": "rlhfruns"},
            "requestKind": {"group": "rlhf.dev", "version": "v1alpha1", "kind": "RLHFRun"},
            "requestResource": {"group": "rlhf.dev", "version": "v1alpha1",
                                "resource": "rlhfruns"},
            "name": meta["name"],
            "namespace": meta["namespace"],
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
        }
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": request}
        http = urllib.request.Request(
            self.url, data=json.dumps(review).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(http, context=context or self.context, timeout=10) as answer:
            reply = json.loads(answer.read())
        assert reply["apiVersion"] == "admission.k8s.io/v1" and reply["kind"] == "AdmissionReview"
        response: Obj = reply["response"]
        assert response["uid"] == request["uid"]
        return response

    def up(self) -> bool:
        try:
            self.review(manifest())
        except (urllib.error.URLError, ConnectionError):
            return False
        return True


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    tmp = tmp_path_factory.mktemp("webhook")
    certs = issue_certificates(tmp)
    port = free_port()
    env = {"RLHF_WEBHOOK_PORT": str(port), "RLHF_WEBHOOK_CERT_DIR": str(certs)}
    log = tmp / "operator.log"
    with Emulator() as emulator, operator_process(
        emulator.kubeconfig(tmp / "kubeconfig"), log, "--all-namespaces",
        "--metrics-port", "0", resync_seconds=60, env=env,
    ):
        hook = Webhook(port, certs / "ca.crt")
        try:
            wait_for_operator(emulator)
            wait_for("the webhook to serve", hook.up, timeout=60)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{log.read_text()[-3000:]}") from None
        yield hook


def refused(response: Obj) -> str:
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    return str(response["status"]["message"])


def test_good_runs_are_allowed(webhook: Webhook) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    example["metadata"]["namespace"] = "team-a"
    for doc in (manifest(), example):
        response = webhook.review(doc)
        assert response["allowed"] is True and "status" not in response


def test_a_ppo_stage_without_reward_is_refused_naming_the_field(webhook: Webhook) -> None:
    doc = manifest()
    doc["spec"]["stages"].append({
        "name": "ppo", "type": "ppo", "from": "sft",
        "dataset": {"path": "data/prompts.jsonl", "format": "prompts"},
    })
    message = refused(webhook.review(doc))
    assert "spec.stages[2]" in message and "`reward`" in message


def test_from_a_later_stage_is_refused_naming_the_field(webhook: Webhook) -> None:
    doc = manifest()
    doc["spec"]["stages"][0]["from"] = "sft2"
    message = refused(webhook.review(doc))
    assert "spec.stages[0].from" in message and "'sft2' is not an earlier stage" in message


def test_updates_are_judged_by_their_spec(webhook: Webhook) -> None:
    """A spec edit is validated. An update that leaves the spec alone passes even when the
    stored spec no longer validates (a run created before the webhook, or before an upgrade
    that validates more): kopf's finalizer and annotation patches, and so the run's deletion,
    must never be blocked."""
    good = manifest()
    bad = copy.deepcopy(good)
    bad["spec"]["stages"][1]["from"] = "nope"
    assert "spec.stages[1].from" in refused(webhook.review(bad, "UPDATE", old=good))
    assert webhook.review(good, "UPDATE", old=bad)["allowed"] is True
    released = copy.deepcopy(bad)
    released["metadata"].update(finalizers=[], deletionTimestamp="2026-01-01T00:00:00Z")
    before = copy.deepcopy(bad)
    before["metadata"]["finalizers"] = ["rlhf.dev/finalizer"]
    assert webhook.review(released, "UPDATE", old=before)["allowed"] is True


def test_tls_is_verified(webhook: Webhook) -> None:
    """The certificate is the one the test's CA signed: a client that does not trust that CA
    is refused the connection."""
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        webhook.review(manifest(), context=ssl.create_default_context())
