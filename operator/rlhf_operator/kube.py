"""A small Kubernetes API client for the kube executor.

It gets, lists, creates, merge-patches and deletes any kind by apiVersion and plural, over the
`kubernetes` package's configuration (kubeconfig or in-cluster) and connection pool, and
returns plain dicts. Every failure becomes a KubeError that says whether a retry may help.
`Kube` is the protocol the reconciler needs, so tests can count writes on a fake.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from rlhf_operator import api, backends
from rlhf_operator.objects import Obj

MERGE_PATCH = "application/merge-patch+json"
# Asked of every create and patch: a field the server's schema does not know (a CRD older or
# newer than the builders) is refused with 422 naming it, instead of a warning while the field
# is dropped (the API server's default, Warn).
STRICT = {"fieldValidation": "Strict"}


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        out = f"{root}/namespaces/{quote(namespace, safe='')}/{self.plural}"
        if name is not None:
            out += f"/{quote(name, safe='')}"
        if sub is not None:
            out += f"/{sub}"
        return out


RUNS = Resource(api.API_VERSION, api.KIND, api.PLURAL)
CONFIGMAPS = Resource("v1", "ConfigMap", "configmaps")
SERVICES = Resource("v1", "Service", "services")
PODS = Resource("v1", "Pod", "pods")
EVENTS = Resource("v1", "Event", "events")
DEPLOYMENTS = Resource("apps/v1", "Deployment", "deployments")
JOBS = tuple(Resource(b.api_version, b.kind, b.plural) for b in backends.BACKENDS.values())
# Every kind the planner may ask for. Rollout and judge servers (Deployment, Service) are
# listed already, so they are created, patched and removed like any other child.
CHILDREN: tuple[Resource, ...] = (CONFIGMAPS, *JOBS, DEPLOYMENTS, SERVICES)
BY_KIND: dict[str, Resource] = {r.kind: r for r in (RUNS, *CHILDREN, PODS, EVENTS)}


class KubeConfigError(Exception):
    """No credentials for any cluster: neither in-cluster config nor a kubeconfig file."""


class KubeError(Exception):
    """A failed API call: `status` is the HTTP status, None when the server was not reached."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth retrying as is: no answer, a race with another writer (404, 409), throttled,
        or a server-side error. Anything else is a refusal someone must act on."""
        return self.status is None or self.status in (404, 409, 429) or self.status >= 500


class Kube(Protocol):
    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        """The object, or None if it does not exist."""
        ...

    def list(self, resource: Resource, namespace: str, labels: dict[str, str]) -> list[Obj]:
        """Objects carrying `labels`; empty when the kind is not served (CRD not installed)."""
        ...

    def create(self, obj: Obj) -> Obj:
        """Create, with strict field validation; KubeError(409) when it exists."""
        ...

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Obj, sub: str | None = None
    ) -> Obj:
        """JSON merge patch (RFC 7386) of the object or of its subresource `sub`, with strict
        field validation."""
        ...

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        """Delete in the background (children go through garbage collection); gone is fine."""
        ...


def has_labels(obj: Obj, labels: dict[str, str]) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class ApiKube:
    """`Kube` over HTTP with the `kubernetes` package's ApiClient (auth, TLS, pooling)."""

    def __init__(self, client: Any, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> ApiKube:
        """In-cluster config inside a pod, else the kubeconfig ($KUBECONFIG, read now);
        KubeConfigError, saying what to set, when there is neither."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except config.ConfigException:
            path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
            try:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path, client_configuration=configuration
                )
            except (config.ConfigException, OSError) as err:
                raise KubeConfigError(
                    f"kubeconfig: no cluster to talk to ({err}); outside a pod, set $KUBECONFIG "
                    f"to a kubeconfig file or write ~/.kube/config"
                ) from None
        return cls(client.ApiClient(configuration))

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> Any:
        # Straight to the client's urllib3 pool (TLS, client certificates and proxies as
        # configured): the generated API layer on top changed shape between releases.
        import urllib3

        configuration = self.client.configuration
        headers = {"Accept": "application/json", "Content-Type": content_type}
        for auth in configuration.auth_settings().values():  # a bearer token, refreshed if due
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if query:
            path = f"{path}?{urlencode(query)}"
        try:
            response = self.client.rest_client.pool_manager.request(
                method,
                configuration.host + path,
                body=json.dumps(body) if body is not None else None,
                headers=headers,
                timeout=urllib3.Timeout(total=self.timeout),
                retries=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise KubeError(None, f"{method} {path}: {err}") from err
        text = response.data.decode() if response.data else ""
        if not 200 <= response.status <= 299:
            raise KubeError(response.status, f"{method} {path}: {_message(text)}")
        return json.loads(text) if text else None

    def get(self, resource: Resource, namespace: str, name: str) -> Obj | None:
        try:
            return dict(self._request("GET", resource.path(namespace, name)))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def list(self, resource: Resource, namespace: str, labels: dict[str, str]) -> list[Obj]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            data = self._request("GET", resource.path(namespace), {"labelSelector": selector})
        except KubeError as err:
            if err.status == 404:
                return []
            raise
        items = [{"apiVersion": resource.api_version, "kind": resource.kind, **item}
                 for item in data.get("items") or []]
        return [item for item in items if has_labels(item, labels)]

    def create(self, obj: Obj) -> Obj:
        resource = BY_KIND[obj["kind"]]
        namespace = obj["metadata"]["namespace"]
        return dict(self._request("POST", resource.path(namespace), STRICT, body=obj))

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: Obj, sub: str | None = None
    ) -> Obj:
        path = resource.path(namespace, name, sub)
        return dict(self._request("PATCH", path, STRICT, body=patch, content_type=MERGE_PATCH))

    def delete(self, resource: Resource, namespace: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            self._request("DELETE", resource.path(namespace, name), body=body)
        except KubeError as err:
            if err.status != 404:
                raise


def _message(text: str) -> str:
    """The `message` of a Kubernetes Status body, or the start of the body."""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    return str(data.get("message") or text[:300]) if isinstance(data, dict) else text[:300]
