"""The trainer's progress annotation: rate-limited, final step always sent, never fatal.
(Against a real API server over HTTP: tests/integration/test_operator.py.)"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from rlhf_trainer.runtime import kube_progress
from rlhf_trainer.runtime.kube_progress import PodAnnotator

pytestmark = pytest.mark.unit


class Sent:
    def __init__(self) -> None:
        self.requests: list[urllib.request.Request] = []
        self.fail = False

    def __call__(self, request: urllib.request.Request, **_: Any) -> Any:
        self.requests.append(request)
        if self.fail:
            raise urllib.error.URLError("connection refused")
        return _Response()


class _Response:
    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    recorder = Sent()
    monkeypatch.setattr(urllib.request, "urlopen", recorder)
    return recorder


def test_patch_is_a_merge_patch_of_one_annotation(sent: Sent, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret-1\n")
    annotator = PodAnnotator("https://10.0.0.1:443", "team-a", "demo-sft-master-0", token)
    progress = {"step": 3, "totalSteps": 9, "metrics": {"loss": 1.5}}
    assert annotator.report(progress)
    [request] = sent.requests
    assert request.get_method() == "PATCH"
    assert request.full_url == "https://10.0.0.1:443/api/v1/namespaces/team-a/pods/demo-sft-master-0"
    assert request.get_header("Content-type") == "application/merge-patch+json"
    assert request.get_header("Authorization") == "Bearer secret-1"
    assert isinstance(request.data, bytes)
    body = json.loads(request.data)
    assert json.loads(body["metadata"]["annotations"]["rlhf.dev/progress"]) == progress


def test_reports_are_rate_limited_unless_forced(sent: Sent) -> None:
    now = [0.0]
    annotator = PodAnnotator("http://api", "ns", "pod", min_interval=10, clock=lambda: now[0])
    assert annotator.report({"step": 1})
    now[0] = 5
    assert not annotator.report({"step": 2})
    assert annotator.report({"step": 3}, force=True)
    now[0] = 16
    assert annotator.report({"step": 4})
    assert len(sent.requests) == 3


def test_a_failure_is_logged_once_backs_off_and_never_raises(
    sent: Sent, caplog: pytest.LogCaptureFixture
) -> None:
    sent.fail = True
    now = [0.0]
    annotator = PodAnnotator("http://api", "ns", "pod", min_interval=1, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert not annotator.report({"step": 1})
        now[0] = 30
        assert not annotator.report({"step": 2}), "backing off after a failure"
        now[0] = 61
        assert not annotator.report({"step": 3})
    assert len(sent.requests) == 2
    assert len([r for r in caplog.records if "Failed to report progress" in r.message]) == 1


def test_outside_a_pod_nothing_happens(sent: Sent, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PodAnnotator.from_env({}) is None
    assert PodAnnotator.from_env({"POD_NAME": "p", "POD_NAMESPACE": "n"}) is None
    monkeypatch.setattr(kube_progress, "_resolved", False)
    monkeypatch.setattr(kube_progress, "SERVICE_ACCOUNT", Path("/nonexistent"))
    assert not kube_progress.publish({"step": 1, "totalSteps": 2})
    assert sent.requests == []


def test_publish_forces_the_last_step(sent: Sent, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    annotator = PodAnnotator("http://api", "ns", "pod", min_interval=60, clock=lambda: now[0])
    monkeypatch.setattr(kube_progress, "_annotator", annotator)
    monkeypatch.setattr(kube_progress, "_resolved", True)
    assert kube_progress.publish({"step": 1, "totalSteps": 3})
    assert not kube_progress.publish({"step": 2, "totalSteps": 3})
    assert kube_progress.publish({"step": 3, "totalSteps": 3}), "the final step always goes out"


def test_publish_file_reads_progress_json(
    sent: Sent, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    annotator = PodAnnotator("http://api", "ns", "pod", min_interval=0)
    monkeypatch.setattr(kube_progress, "_annotator", annotator)
    monkeypatch.setattr(kube_progress, "_resolved", True)
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({"step": 2, "totalSteps": 5, "metrics": {"loss": 0.5}}))
    assert kube_progress.publish_file(path)
    path.write_text("{torn")
    assert not kube_progress.publish_file(path)
    assert len(sent.requests) == 1
