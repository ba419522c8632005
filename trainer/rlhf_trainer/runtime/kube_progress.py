"""Progress from the trainer to the operator: a JSON annotation on the trainer's own pod.

Rank 0 merge-patches `rlhf.dev/progress` ({step, totalSteps, metrics, updatedAt}, the shape of
progress.json) onto the pod it runs in; the operator watches trainer pods and copies it into
`status.stages[].metrics`. The pod is named by the downward-API env POD_NAME and
POD_NAMESPACE that the operator's builders set, and the call uses the pod's service-account
token (the account needs `get` and `patch` on pods). Outside a pod this is a no-op.

Stdlib only (urllib), so it costs the trainer no dependency. Reports are rate-limited, the
last step of a run always goes out, and a failure is logged once and never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_trainer import __version__

# Names the trainer in API server audit logs (and lets tests tell its calls apart).
USER_AGENT = f"rlhf-trainer/{__version__}"

ANNOTATION = "rlhf.dev/progress"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MIN_INTERVAL_S = float(os.environ.get("RLHF_PROGRESS_INTERVAL", "10"))
FAILURE_BACKOFF_S = 60.0

logger = logging.getLogger(__name__)


class PodAnnotator:
    """Patches the progress annotation onto one pod, at most every `min_interval` seconds."""

    def __init__(
        self,
        base_url: str,
        namespace: str,
        pod: str,
        token_path: Path | None = None,
        context: ssl.SSLContext | None = None,
        min_interval: float = MIN_INTERVAL_S,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token_path = token_path
        self.context = context
        self.min_interval = min_interval
        self.timeout = timeout
        self.clock = clock
        self._next = 0.0
        self._warned = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> PodAnnotator | None:
        """The annotator for this pod, or None when not in a pod the operator built."""
        env = dict(os.environ if env is None else env)
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        pod, namespace = env.get("POD_NAME"), env.get("POD_NAMESPACE")
        token = SERVICE_ACCOUNT / "token"
        if not (host and port and pod and namespace and token.is_file()):
            return None
        host = f"[{host}]" if ":" in host else host  # IPv6 service address
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        return cls(f"https://{host}:{port}", namespace, pod, token, context)

    def report(self, progress: dict[str, Any], force: bool = False) -> bool:
        """Send `progress` unless one went out less than `min_interval` ago; True if sent."""
        now = self.clock()
        if not force and now < self._next:
            return False
        self._next = now + self.min_interval
        patch = {"metadata": {"annotations": {ANNOTATION: json.dumps(progress)}}}
        request = urllib.request.Request(
            self.url,
            data=json.dumps(patch).encode(),
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "User-Agent": USER_AGENT,
                **self._auth(),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context):
                return True
        except (urllib.error.URLError, OSError, ValueError) as err:
            self._next = now + max(self.min_interval, FAILURE_BACKOFF_S)
            if not self._warned:
                self._warned = True
                logger.warning("Failed to report progress on pod %s: %s", self.url, err)
            return False

    def _auth(self) -> dict[str, str]:
        if self.token_path is None:
            return {}
        # Bound service-account tokens rotate: read the file every time.
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}


_annotator: PodAnnotator | None = None
_resolved = False


def _this_pod() -> PodAnnotator | None:
    global _annotator, _resolved
    if not _resolved:
        _annotator, _resolved = PodAnnotator.from_env(), True
    return _annotator


def publish(progress: dict[str, Any]) -> bool:
    """Report a progress document from rank 0; the last step (step >= totalSteps) is always
    sent. A no-op outside a Kubernetes pod built by the operator."""
    annotator = _this_pod()
    if annotator is None:
        return False
    step, total = progress.get("step"), progress.get("totalSteps")
    final = isinstance(step, int) and isinstance(total, int) and step >= total
    return annotator.report(progress, force=final)


def publish_file(path: Path) -> bool:
    """`publish` the progress.json just written at `path` (the trainer's one-line hook)."""
    if _this_pod() is None:
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return publish(data) if isinstance(data, dict) else False
