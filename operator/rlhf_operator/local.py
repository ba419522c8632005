"""The local executor: runs the planner's desired children as processes on this machine.

It plays the parts a cluster plays. ConfigMaps become files. A trainer job (PyTorchJob or
TrainJob, through its backend) becomes one `torchrun` process per replica, started from the
container command in its pod spec with the env the training operator injects (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE, PET_*),
`$(VAR)` references expanded as the kubelet does, and each volume mount mapped to a local
folder (the workspace to the work dir). Process states are reported back to `plan` as job
objects with the status their Kubeflow controller would write, so a local run exercises the
very commands a cluster runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rlhf_operator import api, backends, builders, local_servers
from rlhf_operator.local_precision import bf16_fallback_events, host_cpu_bf16
from rlhf_operator.local_procs import StopSignals, die_with_parent, interrupted_status, stop_groups
from rlhf_operator.local_servers import SERVER_KINDS, LocalServers, local_server_env
from rlhf_operator.metrics import RunMetrics
from rlhf_operator.objects import Obj
from rlhf_operator.planner import Event, Observed, Plan, config_hash, plan

TERMINAL = ("Succeeded", "Failed")


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalJob:
    """One trainer job (PyTorchJob or TrainJob) as local processes, one torchrun per replica."""

    obj: Obj
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    conditions: list[Obj] = field(default_factory=list)

    def condition(self, ctype: str, message: str = "") -> None:
        self.conditions.append(
            {"type": ctype, "status": "True", "message": message, "lastTransitionTime": now_iso()}
        )

    @property
    def phase(self) -> str:
        return str(self.conditions[-1]["type"]) if self.conditions else "Created"

    def status(self) -> Obj:
        """The status the job's cluster controller would report (its backend's shape)."""
        last = self.conditions[-1] if self.conditions else {}
        phases: dict[str, api.Phase] = {
            p: p for p in ("Running", "Succeeded", "Failed", "Suspended")
        }
        phase = phases.get(str(last.get("type")), "Pending")
        backend = backends.for_kind(self.obj["kind"])
        return backend.status_for(phase, str(last.get("message", "")))


class LocalExecutor:
    """Reconciles one RLHFRun into local processes until it finishes."""

    def __init__(
        self,
        run: api.RLHFRun,
        workdir: Path,
        on_event: Callable[[Event], None] | None = None,
        on_status: Callable[[api.RunStatus], None] | None = None,
        poll_seconds: float = 0.5,
        metrics: RunMetrics | None = None,
        trainer_metrics_port: int | None = None,
    ) -> None:
        self.run = run
        self.workdir = workdir.resolve()
        self.run_dir = self.workdir / run.metadata.name
        self.jobs: dict[str, LocalJob] = {}
        self.configmaps: dict[str, Obj] = {}
        self.on_event = on_event or (lambda event: None)
        self.on_status = on_status or (lambda status: None)
        self.poll_seconds = poll_seconds
        self.servers = LocalServers(
            spawn=lambda pod, log, to_local: self._spawn(pod, {}, log, to_local),
            log_dir=self.run_dir / "logs",
            free_port=free_port,
        )
        self.metrics = metrics or RunMetrics()
        # Pods each have an IP, processes here share one: like `docker run -p`, the trainer's
        # metrics port (9400 in its pod spec) can be moved. Only global rank 0 binds it.
        self.host_env: dict[str, str] = {}
        if trainer_metrics_port is not None:
            self.host_env["RLHF_METRICS_PORT"] = str(trainer_metrics_port)

    # -- observe ---------------------------------------------------------------------------
    def observe(self) -> Observed:
        children: list[Obj] = list(self.configmaps.values())
        children.extend(self.servers.observe())
        progress: dict[str, api.StageMetrics] = {}
        for job in self.jobs.values():
            self._poll(job)
            children.append({**job.obj, "status": job.status()})
        for stage in self.run.spec.stages:
            metrics = read_progress(self.run_dir / stage.name / "progress.json")
            if metrics is not None:
                progress[stage.name] = metrics
        return Observed(
            children=children, progress=progress, workspace=str(self.workdir), now=now_iso()
        )

    def _poll(self, job: LocalJob) -> None:
        if job.phase in ("Succeeded", "Failed", "Suspended"):
            return
        codes = [p.poll() for p in job.procs]
        if any(c not in (None, 0) for c in codes):
            self._terminate(job)
            job.condition("Failed", failure_message(job.logs))
        elif all(c == 0 for c in codes):
            job.condition("Succeeded", "All replicas exited 0")

    # -- apply -----------------------------------------------------------------------------
    def apply(self, desired: Plan) -> None:
        wanted = {c["metadata"]["name"]: c for c in desired.children}
        for name in [n for n in self.jobs if n not in wanted]:
            self._terminate(self.jobs.pop(name))
        # Servers first: their local ports go into the ConfigMaps that name their Services.
        self.servers.apply([c for c in desired.children if c["kind"] in SERVER_KINDS])
        for name, child in wanted.items():
            if child["kind"] == "ConfigMap":
                self._write_configmap(child)
            elif child["kind"] in backends.JOB_KINDS:
                self._apply_job(name, child)
            elif child["kind"] in SERVER_KINDS:
                continue
            else:
                raise ValueError(f"the local executor cannot run a {child['kind']}")

    def _write_configmap(self, obj: Obj) -> None:
        folder = self._configmap_dir(obj["metadata"]["name"])
        folder.mkdir(parents=True, exist_ok=True)
        for key, raw in obj.get("data", {}).items():
            value = self.servers.rewrite_urls(raw)
            path = folder / key
            if not path.exists() or path.read_text() != value:
                path.write_text(value)
        self.configmaps[obj["metadata"]["name"]] = obj

    def _configmap_dir(self, name: str) -> Path:
        return self.run_dir / ".configmaps" / name

    def _apply_job(self, name: str, obj: Obj) -> None:
        job = self.jobs.get(name)
        # No Kueue here: a queued run's job, created suspended for Kueue, is admitted at once.
        suspend = backends.is_suspended(obj) and builders.held(self.run)
        if job is not None and config_hash(job.obj) != config_hash(obj):
            self._terminate(self.jobs.pop(name))  # the spec changed: replace the job
            job = None
        if job is not None and job.phase in TERMINAL:
            return
        if suspend:
            if job is not None and job.phase != "Suspended":
                self._terminate(job)
                job.condition("Suspended", "Suspended by spec.suspend")
            return
        if job is None or job.phase == "Suspended":
            self.jobs[name] = self._start(obj)

    def _start(self, obj: Obj) -> LocalJob:
        launch = backends.for_kind(obj["kind"]).local_launch(obj)
        port = free_port()
        procs, logs = [], []
        for rank in range(launch.replicas):
            env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(launch.replicas),
                "PET_NNODES": str(launch.replicas),
                "PET_NPROC_PER_NODE": launch.nproc_per_node,
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
            }
            log = self.run_dir / "logs" / f"{obj['metadata']['name']}-{rank}.log"
            procs.append(self._spawn(launch.pod, env, log))
            logs.append(log)
        job = LocalJob(obj=obj, procs=procs, logs=logs)
        job.condition("Running", f"Started {len(procs)} local replica(s)")
        return job

    def _spawn(
        self,
        pod: Obj,
        injected: dict[str, str],
        log: Path,
        to_local: Callable[[list[str]], list[str]] | None = None,
    ) -> subprocess.Popen[bytes]:
        container = pod["containers"][0]
        mounts = self._mounts(pod, container)
        env = dict(os.environ)
        env.update(injected)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = remap(expand(str(item["value"]), env), mounts)
        env.update(self.host_env)
        command = [*container["command"], *container.get("args", [])]
        argv = [remap(expand(arg, env), mounts) for arg in command]
        argv = (to_local or local_argv)(argv)
        env.update(local_server_env(argv))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            # Its own session, so that stopping it reaches every process it starts; and SIGTERM
            # when `rlhf run` dies, even by SIGKILL, so that none outlives it (local_procs).
            return subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def _mounts(self, pod: Obj, container: Obj) -> dict[str, Path]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                mounts[mount["mountPath"]] = self._configmap_dir(volume["configMap"]["name"])
            elif mount["name"] == "workspace":
                mounts[mount["mountPath"]] = self.workdir
        return mounts

    def _terminate(self, job: LocalJob) -> None:
        stop_groups(job.procs)

    # -- loop ------------------------------------------------------------------------------
    def reconcile(self) -> Plan:
        with self.metrics.reconcile_timer():
            desired = plan(self.run, self.observe())
            self.apply(desired)
        self.run = self.run.model_copy(update={"status": desired.status})
        self.metrics.observe_run(self.run, desired.status)
        write_status(self.run_dir / "status.json", desired.status)
        for event in desired.events:
            self.on_event(event)
        self.on_status(desired.status)
        return desired

    def execute(self) -> api.RunStatus:
        """Reconcile until the run succeeds, fails or is refused; returns the final status.
        SIGINT, SIGTERM and SIGHUP raise `local_procs.Interrupted` once the children are stopped
        and status.json says so. Children are spawned on the calling thread (their parent-death
        signal follows it), and all are stopped before this returns."""
        # The trainers warn in their own logs; this says it where the user is looking.
        for event in bf16_fallback_events(self.run, host_cpu_bf16(), self.servers.bf16_kept):
            self.on_event(event)
        with StopSignals() as signals:
            try:
                while True:
                    desired = self.reconcile()
                    status = desired.status
                    if status.phase in TERMINAL or not desired.children:
                        return status
                    time.sleep(self.poll_seconds)
            finally:
                signals.hold()  # a signal now waits until the children are stopped
                for job in self.jobs.values():
                    self._terminate(job)
                self.servers.stop_all()
                if signals.received is not None:
                    self._record_interrupt(signals.received)

    def _record_interrupt(self, signum: int) -> None:
        """Write the status of a run stopped by `signum`, once its children are stopped."""
        previous = self.run.status or api.RunStatus()
        status = interrupted_status(previous, signum, now_iso())
        if status == previous:
            return  # it had finished already
        self.run = self.run.model_copy(update={"status": status})
        self.metrics.observe_run(self.run, status)
        write_status(self.run_dir / "status.json", status)
        # After SIGHUP the terminal may be gone; status.json holds the record.
        with contextlib.suppress(OSError):
            self.on_event(Event("Warning", "RunInterrupted", status.conditions[0].message))
            self.on_status(status)


def expand(text: str, env: dict[str, str]) -> str:
    """Expand `$(VAR)` as the kubelet does for command and args; unknown references stay."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def remap(text: str, mounts: dict[str, Path]) -> str:
    """Rewrite a path under a pod mount to the local folder that stands in for it."""
    for mount_path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if text == mount_path or text.startswith(mount_path + "/"):
            return str(local) + text[len(mount_path) :]
    return text


def local_argv(argv: list[str]) -> list[str]:
    """Run `torchrun` and `python` from this interpreter's environment."""
    if argv and argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def failure_message(logs: list[Path]) -> str:
    """The trainer's own `error:` line if it printed one, else the last lines of its log."""
    lines: list[str] = []
    for log in logs:
        with contextlib.suppress(OSError):
            lines.extend(log.read_text(errors="replace").splitlines())
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1].removeprefix("error:").strip()
    tail = [line for line in lines if line.strip()][-3:]
    return " | ".join(tail) if tail else "the trainer exited non-zero"


def read_progress(path: Path) -> api.StageMetrics | None:
    """Read a trainer's progress.json into stage metrics; a torn or missing file is None."""
    try:
        return api.StageMetrics.from_progress(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def write_status(path: Path, status: api.RunStatus) -> None:
    """Write status.json atomically, in the CR status shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status.dump(), indent=2) + "\n")
    os.replace(tmp, path)


def _model_paths(run: api.RLHFRun) -> list[tuple[str, str]]:
    """(field, path) of every local model a run reads that no stage of it writes."""
    paths = [("spec.model.path", run.spec.model.path)]
    paths += [(f"spec.stages[{i}].model.path", s.model.path if s.model else None)
              for i, s in enumerate(run.spec.stages)]
    if run.spec.judge is not None:
        paths.append(("spec.judge.model.path", run.spec.judge.model.path))
    # A path under the run's own folder is a stage's output, written during the run.
    return [(f, p) for f, p in paths if p is not None and not p.startswith(f"{run.metadata.name}/")]


def preflight(run: api.RLHFRun, workdir: Path) -> list[str]:
    """What a local run can check before anything starts: models, datasets, environments."""
    def local(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else workdir / path

    problems = local_servers.environment_problems(run)
    for where, path in _model_paths(run):
        if not local(path).exists():
            build = f", or build one with `rlhf tiny-model {local(path)}`"
            problems.append(
                f"{where}: {local(path)} does not exist; point it at a Hugging Face model folder "
                "(relative paths are relative to --workdir)"
                + (build if where == "spec.model.path" else "")
            )
    produced: list[str] = []  # outputs of earlier stages: written during the run
    for index, stage in enumerate(run.spec.stages):
        dataset = stage.dataset
        later = dataset is not None and dataset.path is not None and any(
            dataset.path.startswith(folder) for folder in produced
        )
        produced.append(f"{run.metadata.name}/{stage.name}/")
        if later or dataset is None or dataset.path is None:
            continue
        if not local(dataset.path).is_file():
            problems.append(
                f"spec.stages[{index}].dataset.path: {local(dataset.path)} is not a file; "
                "relative paths are relative to --workdir"
            )
    return problems
