"""`rlhf operator`: the kopf operator. Every handler ends in the same reconcile.

Triggers: the RLHFRun created, updated or resumed after a restart; a resync timer; a trainer
job's status (PyTorchJob, TrainJob); a server Deployment's availability; a trainer pod's
progress annotation. Children are mapped to their run by the `rlhf.dev/run` label, and the
watches on them are label-selected on the server. Reconciles of one run never overlap, a
burst of child events collapses into one reconcile, and an event that only echoes the
operator's own write of a child costs none.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from rlhf_operator import api, builders, kube
from rlhf_operator.kube import KubeError
from rlhf_operator.metrics import DEFAULT_PORT, RunMetrics
from rlhf_operator.reconcile import Reconciler

logger = logging.getLogger("rlhf_operator.controller")

RUN = (api.GROUP, api.VERSION, api.PLURAL)
DEFAULT_RESYNC_SECONDS = 60.0
TRANSIENT_DELAY = 10.0  # throttled, unreachable or a server error: retry soon
PERSISTENT_DELAY = 60.0  # refused (RBAC, admission): someone must act; retry slowly


class Controller:
    """Serialises reconciles per run and turns API failures into kopf retries.

    The reconcile itself is blocking I/O and runs in a worker thread; the handlers stay async,
    so kopf can stop a run's timer at once when the run is deleted.
    """

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # The triggers of the reconcile queued for a run: the child whose event it was, or
        # None for any other trigger.
        self._queued: dict[tuple[str, str], list[Mapping[str, Any] | None]] = {}

    async def reconcile(
        self,
        namespace: str,
        name: str,
        coalesce: bool = False,
        child: Mapping[str, Any] | None = None,
    ) -> None:
        """Reconcile now; with `coalesce`, join a reconcile of the run that is already queued
        (it reads fresh state when it starts, so it covers this trigger too). A reconcile all
        of whose triggers are children exactly as this operator wrote them is skipped."""
        key = (namespace, name)
        queued = self._queued.get(key)
        if coalesce and queued is not None:
            queued.append(child)
            return
        triggers = self._queued[key] = [child]
        # Shielded: a cancelled handler must not release the lock while its thread still runs.
        task = asyncio.ensure_future(self._locked(key, triggers))
        try:
            await asyncio.shield(task)
        except KubeError as err:
            delay = TRANSIENT_DELAY if err.transient else PERSISTENT_DELAY
            raise kopf.TemporaryError(
                f"Failed to reconcile RLHFRun {namespace}/{name}: {err}", delay=delay
            ) from err

    async def _locked(
        self, key: tuple[str, str], triggers: list[Mapping[str, Any] | None]
    ) -> None:
        async with self._locks.setdefault(key, asyncio.Lock()):
            if self._queued.get(key) is triggers:
                del self._queued[key]
            # Checked once the lock is held: the reconcile that wrote a child may still have
            # been running when the child's event came.
            if all(t is not None and self.reconciler.wrote_last(t) for t in triggers):
                return
            await asyncio.to_thread(self.reconciler.reconcile, *key)

    def forget(self, namespace: str, name: str) -> None:
        """A deleted run: drop its metric series, its writes and its lock (children go by
        GC)."""
        self.reconciler.forget(namespace, name)
        lock = self._locks.get((namespace, name))
        if lock is not None and not lock.locked():
            del self._locks[(namespace, name)]

    async def reconcile_quietly(
        self, namespace: str, name: str, child: Mapping[str, Any] | None = None
    ) -> None:
        """For event handlers, which kopf does not retry: log, and let the timer retry."""
        try:
            await self.reconcile(namespace, name, coalesce=True, child=child)
        except kopf.TemporaryError as err:
            logger.warning("%s; the resync timer retries", err)


def configure(settings: kopf.OperatorSettings) -> None:
    """Keep kopf's bookkeeping out of `status` and kopf's own Events off the run."""
    settings.persistence.finalizer = "rlhf.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="rlhf.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="rlhf.dev", key="last-handled-configuration"
    )
    # The reconciler posts the Events that matter (stage started, failed, ...).
    settings.posting.enabled = False
    # A run deleted while its resync timer is mid-reconcile is let go (finalizer removed) a
    # second after that reconcile ends, not a minute.
    settings.background.cancellation_polling = 1.0
    for resource in (*kube.JOBS, kube.DEPLOYMENTS, kube.PODS):
        group, _, version = resource.api_version.rpartition("/")
        settings.watching.label_selectors[group, version, resource.plural] = builders.LABEL_RUN


WEBHOOK_ID = "validate-rlhfrun"  # the path the chart's ValidatingWebhookConfiguration calls


def admission_problems(
    body: Mapping[str, Any], old: Mapping[str, Any] | None = None
) -> list[str]:
    """What the validating webhook refuses: every problem `rlhf validate` finds, by field.

    An update (`old` given) that leaves the spec as it was is never refused: kopf's own
    finalizer and annotation patches, and so the run's deletion, must go through even when the
    stored spec does not validate (a run from before the webhook, or before an upgrade).
    """
    if old is not None and old.get("spec") == body.get("spec"):
        return []
    try:
        api.parse_run({k: v for k, v in body.items() if k != "status"}, "RLHFRun")
    except api.SpecError as err:
        return err.problems
    return []


def webhook_server(env: Mapping[str, str]) -> kopf.WebhookServer | None:
    """The admission server when the chart enables the webhook (RLHF_WEBHOOK_PORT), serving
    the certificate from RLHF_WEBHOOK_CERT_DIR (cert-manager or a provided secret)."""
    port = env.get("RLHF_WEBHOOK_PORT")
    if not port:
        return None
    cert_dir = env.get("RLHF_WEBHOOK_CERT_DIR", "/etc/rlhf/webhook-tls")
    return kopf.WebhookServer(
        addr="0.0.0.0",
        port=int(port),
        certfile=f"{cert_dir}/tls.crt",
        pkeyfile=f"{cert_dir}/tls.key",
    )


def build_registry(
    controller: Controller,
    resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    webhook: kopf.WebhookServer | None = None,
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        # The chart owns the webhook configuration; kopf only serves it.
        settings.admission.server = webhook
        settings.admission.managed = None

    if webhook is not None:  # kopf refuses admission handlers with no server to serve them

        @kopf.on.validate(
            *RUN, registry=registry, id=WEBHOOK_ID, operations=["CREATE", "UPDATE"]
        )
        def validate(body: Mapping[str, Any], **kwargs: Any) -> None:
            old = kwargs.get("old") if kwargs.get("operation") == "UPDATE" else None
            problems = admission_problems(body, old)
            if problems:
                raise kopf.AdmissionError("\n".join(problems), code=422)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # Through the kubernetes client, as the reconciler: in-cluster account, else the
        # kubeconfig, exec credential plugins (EKS, GKE, AKS) included.
        return kopf.login_via_client(**kwargs)

    @kopf.on.create(*RUN, registry=registry, id="run-created")
    @kopf.on.update(*RUN, registry=registry, id="run-updated")
    @kopf.on.resume(*RUN, registry=registry, id="run-resumed")
    async def run_changed(namespace: str | None, name: str, **_: Any) -> None:
        await controller.reconcile(namespace or "default", name)

    @kopf.on.delete(*RUN, registry=registry, id="run-deleted", optional=True)
    async def run_deleted(namespace: str | None, name: str, **_: Any) -> None:
        controller.forget(namespace or "default", name)

    # The first tick waits a whole interval: creation and resumption reconcile already.
    @kopf.timer(
        *RUN, interval=resync_seconds, initial_delay=resync_seconds, registry=registry,
        id="resync",
    )
    async def resync(namespace: str | None, name: str, **_: Any) -> None:
        await controller.reconcile(namespace or "default", name, coalesce=True)

    async def child_changed(
        namespace: str | None, labels: Mapping[str, str], body: Mapping[str, Any], **_: Any
    ) -> None:
        run = labels[builders.LABEL_RUN]
        await controller.reconcile_quietly(namespace or "default", run, child=body)

    has_run = {builders.LABEL_RUN: kopf.PRESENT}
    for resource in (*kube.JOBS, kube.DEPLOYMENTS):
        group, _, version = resource.api_version.rpartition("/")
        kopf.on.event(
            group, version, resource.plural, labels=has_run, registry=registry,
            id=f"{resource.plural}-changed",
        )(child_changed)
    kopf.on.event(
        "", "v1", "pods", labels=has_run,
        annotations={builders.ANNOTATION_PROGRESS: kopf.PRESENT},
        registry=registry, id="progress-reported",
    )(child_changed)
    return registry


def run_operator(
    namespaces: Sequence[str],
    all_namespaces: bool,
    resync_seconds: float = DEFAULT_RESYNC_SECONDS,
    liveness: str | None = None,
    metrics_port: int = DEFAULT_PORT,
    verbose: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM, with the kubeconfig or the in-cluster service account."""
    kopf.configure(verbose=verbose)
    logging.getLogger("rlhf_operator").setLevel(logging.INFO)
    client = kube.ApiKube.from_environment()  # before anything starts: no cluster, no operator
    metrics = RunMetrics()
    server = metrics.serve(metrics_port)
    logger.info("Serving operator metrics on port %d", server.server_port)
    controller = Controller(Reconciler(client, metrics=metrics))
    kopf.run(
        registry=build_registry(controller, resync_seconds, webhook_server(os.environ)),
        standalone=True,  # one replica (Recreate); no peering objects needed
        clusterwide=all_namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=liveness,
    )
