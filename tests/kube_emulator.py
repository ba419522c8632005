"""A Kubernetes API emulator over real HTTP for operator tests: kmock's KubernetesEmulator in a
background thread, a kubeconfig pointing at it, a small JSON client, and `rlhf operator` as a
subprocess.

The emulator stores objects, streams watch events and filters lists and watches by label
selector (equality and existence), but it has no schema validation, merge strategies beyond
JSON merge patch, generation bumps or garbage collection: tests set `metadata.generation`
themselves and cover the rest with pure-function tests.
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
from collections.abc import AsyncIterator, Callable, Iterator
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


def _sees(view: Any, request: Any, root: Any) -> bool:
    """`request in view` for the request being served, asking each filter of the chain about
    that one request. kmock's own `in` replays the whole request log through the filters."""
    if view is root:
        return True  # the root records every request before serving it
    if type(view) is kmock.Filter:
        return bool(view.criteria(request)) and _sees(view._source, request, root)
    if type(view) is kmock.Priority:
        return _sees(view._source, request, root)
    return request in view  # slices, groups, exclusions: kmock's own way


class ConstantTimeDispatch(kmock.RawHandler):
    """kmock's dispatch of a request to the first matching reaction, at a cost that does not
    grow with the requests served before. kmock checks each reaction's filters against every
    request it has logged, so a request cost 30 ms after a hundred and 400 ms after five
    hundred: a scale test would measure the emulator, not the operator."""

    async def _handle(self, request: Any) -> Any:
        width = max((len(p.priorities) for p in self._payloads), default=0)
        payloads = sorted(  # as kmock orders them: padded, higher priority first, stable
            self._payloads,
            key=lambda p: tuple(-x for x in p.priorities) + (0,) * (width - len(p.priorities)),
        )
        for payload in payloads:
            if payload._disabled.is_set() or not _sees(payload._source, request, self):
                continue
            try:
                return await payload(request)
            except kmock.ReactionMismatchError:  # a mismatch or a depleted reaction
                payload._disabled.set()
            except NotImplementedError:  # matched, but nothing to respond with
                pass
        raise NotImplementedError("Undefined server behaviour: no reaction matches the request")


def label_matcher(selector: str | None) -> Callable[[Obj], bool]:
    """What an API server's `labelSelector` keeps: `k=v`, `k==v`, `k!=v`, `k`, `!k`, joined
    by commas. Set-based terms (`in`, `notin`) are refused: nothing here sends them."""
    terms: list[Callable[[dict[str, str]], bool]] = []
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if " in " in term or " notin " in term or "(" in term:
            raise kmock.KubernetesError(status=400, reason="BadRequest",
                                        message=f"set-based selector not emulated: {term}")
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            terms.append(lambda labels, k=term[1:]: k not in labels)
        else:
            terms.append(lambda labels, k=term: k in labels)

    def matches(obj: Obj) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(term(labels) for term in terms)

    return matches


class VersionedEmulator(kmock.KubernetesEmulator, ConstantTimeDispatch):
    """The emulator plus what every API server does: a new resourceVersion on a write (kopf
    relies on it to tell its own patches from older events), a uid and creationTimestamp on
    create, 422 when a JSON patch's `test` op fails, and label-selected lists and watches."""

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

    def _get_resources(self) -> list[Any]:
        # The declared resources (RESOURCES) only: kmock also derives them from every stored
        # object, on every request.
        return list(super(kmock.KubernetesEmulator, self)._get_resources())

    async def _serve_list(self, request: Any) -> Any:
        listing = await super()._serve_list(request)
        matches = label_matcher(request.params.get("labelSelector"))
        return {**listing, "items": [obj for obj in listing["items"] if matches(obj)]}

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        matches = label_matcher(request.params.get("labelSelector"))
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or matches(event.get("object") or {}):
                yield event

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
    kubeconfig: Path, log: Path, *args: str, resync_seconds: float = 1.0,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`rlhf operator ARGS` against the emulator, with `env` added to the environment;
    stopped with SIGTERM (SIGKILL if stuck)."""
    env = {**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
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

