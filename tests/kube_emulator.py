"""A Kubernetes API emulator over real HTTP for operator tests: kmock's KubernetesEmulator in a
background thread, a kubeconfig pointing at it, a small JSON client, and `rlhf operator` as a
subprocess.

The emulator stores objects and streams watch events, but it has no schema validation, merge
strategies beyond JSON merge patch, label selectors, generation bumps or garbage collection:
tests set `metadata.generation` themselves and cover the rest with pure-function tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiohttp.web
import jsonpatch
import kmock

CREATE, UPDATE = kmock.action.CREATE, kmock.action.UPDATE

Obj = dict[str, Any]
T = TypeVar("T")

TEST_AGENT = "rlhf-tests"

# group/version/plural -> (kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, bool, set[str]]] = {
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
    "v1/events": ("Event", True, set()),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/services": ("Service", True, set()),
    "v1/pods": ("Pod", True, {"status"}),
    "apps/v1/deployments": ("Deployment", True, {"status"}),
    "rlhf.dev/v1alpha1/rlhfruns": ("RLHFRun", True, {"status"}),
    "kubeflow.org/v1/pytorchjobs": ("PyTorchJob", True, {"status"}),
    "trainer.kubeflow.org/v1alpha1/trainjobs": ("TrainJob", True, {"status"}),
}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


class VersionedEmulator(kmock.KubernetesEmulator):
    """The emulator plus what every API server does on a write: a new resourceVersion (kopf
    relies on it to tell its own patches from older events), a uid and creationTimestamp on
    create, and 422 when a JSON patch's `test` op fails."""

    _versions: ClassVar[Iterator[int]] = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action in (CREATE, UPDATE):
            version = str(next(self._versions))
            data = request.data
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = version
                if request.action == CREATE:
                    meta.setdefault("uid", str(uuid.uuid4()))
                    meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ"))
            elif isinstance(data, list):  # a JSON patch: its `test` ops see the old version
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as err:
            # What the API server answers when a patch's `test` op fails; kopf expects it.
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(err)) from err


    async def __call__(self, raw_request: Any) -> Any:
        # kmock 0.8 cannot parse the cluster-scoped namespaces list. Answer as an API server
        # does to an operator without that permission; kopf then watches the namespaces it
        # was given (--namespace) instead of discovering them.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            status = {"kind": "Status", "apiVersion": "v1", "code": 403, "status": "Failure",
                      "reason": "Forbidden", "message": "namespaces is forbidden"}
            return aiohttp.web.json_response(status, status=403)
        return await super().__call__(raw_request)


class Emulator:
    """kmock's KubernetesEmulator served on 127.0.0.1 from a thread with its own loop."""

    def __init__(self) -> None:
        self.url = ""
        self.handler: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="kmock")

    def __enter__(self) -> Emulator:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with VersionedEmulator() as handler, kmock.Server(handler) as server:
            for key, (kind, namespaced, subresources) in RESOURCES.items():
                handler.resources[key] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
                )
            self.handler = handler
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def writes(self, since: int = 0) -> list[str]:
        """Write requests (POST, PATCH, PUT, DELETE) not made by the tests, from request
        number `since` on, as 'METHOD path' lines."""
        out = []
        for request in list(self.handler)[since:]:
            agent = request.headers.get("User-Agent", "")
            if request.method.value in ("POST", "PATCH", "PUT", "DELETE") and agent != TEST_AGENT:
                out.append(f"{request.method.value} {request.url.path}")
        return out

    def api_calls(self) -> set[tuple[str, str, str]]:
        """(apiGroup, resource, verb) of every operator API request, as RBAC
        sees it: `list` vs `watch` vs `get`, subresources as `resource/sub`."""
        calls = set()
        for request in list(self.handler):
            agent = request.headers.get("User-Agent", "")
            if agent == TEST_AGENT or agent.startswith("rlhf-trainer/"):
                continue  # the tests, and trainer pods (their own ServiceAccount)
            call = rbac_call(request.method.value, request.url.path, dict(request.url.query))
            if call is not None:
                calls.add(call)
        return calls

    def request_count(self) -> int:
        return len(list(self.handler))

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
            "current-context": "kmock",
        }
        path.write_text(json.dumps(config))
        return path


class Client:
    """Just enough of a Kubernetes client for tests: JSON over urllib."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def call(self, method: str, path: str, body: Obj | None = None) -> Any:
        content = "application/merge-patch+json" if method == "PATCH" else "application/json"
        request = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Content-Type": content, "User-Agent": TEST_AGENT},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise
        return json.loads(text) if text else None

    def get(self, path: str) -> Obj | None:
        result = self.call("GET", path)
        return dict(result) if result is not None else None

    def items(self, path: str) -> list[Obj]:
        return list((self.call("GET", path) or {}).get("items") or [])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 15.0) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def operator_process(
    kubeconfig: Path, log: Path, *args: str, resync_seconds: float = 1.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`rlhf operator ARGS` against the emulator; stopped with SIGTERM (SIGKILL if stuck)."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "rlhf_operator.cli", "operator", *args,
            "--resync-seconds", str(resync_seconds)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def rbac_call(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str] | None:
    """Map one REST request to the (apiGroup, resource, verb) an RBAC rule must grant;
    None for discovery (/api, /apis, /version), which every authenticated user may read."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) >= 3 and rest[0] == "namespaces":
        rest = rest[2:]  # /namespaces/{ns}/{resource}...: a namespaced resource
    if not rest:
        return None
    resource = rest[0] if len(rest) < 3 else f"{rest[0]}/{rest[2]}"
    named = len(rest) >= 2
    if method == "GET":
        verb = "get" if named else ("watch" if query.get("watch") in ("true", "1") else "list")
    else:
        verb = _VERBS[method] if named or method == "POST" else "deletecollection"
    return group, resource, verb

