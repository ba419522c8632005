"""A fake OpenAI-compatible judge server with scripted faults, for fault-tolerance tests.

It answers `/v1/models` and `/v1/completions` over real HTTP (a threaded server on a free
port). Its faults are keyed by markers in the responses it is asked to compare, so a test
knows which pairs must be dropped and why:

- `[garbage]`: a 200 reply that is no completion (non-JSON, or a choice without a letter);
- `[slow]`: the reply comes after `slow_seconds` (set the client's timeout below it);
- `[error]`: HTTP 500.

Otherwise a verdict prefers the response that contains "good" (in either position, so both
orders agree), with P = 0.9; when neither does, it always answers "A" (pure position bias,
so the orders disagree). A pointwise score is 7 or 9 with P = 0.5 each. Every other request
(the judge's own answer, its critique) gets a fixed text.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PAIR = re.compile(r"A: (?P<a>.*?)\n\nB: (?P<b>.*?)(\n\n|$)", re.S)


def verdict(prompt: str) -> dict[str, Any]:
    matches = list(PAIR.finditer(prompt))
    a, b = (matches[-1]["a"], matches[-1]["b"]) if matches else ("", "")
    letter = "A" if "good" in a or "good" not in b else "B"
    other = "B" if letter == "A" else "A"
    top = {letter: math.log(0.9), other: math.log(0.1)}
    return {"choices": [{"text": letter, "logprobs": {"top_logprobs": [top]}}]}


class Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (a timeout); nothing to answer

    def do_GET(self) -> None:
        self._send(200, json.dumps({"data": [{"id": "judge"}]}).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length))
        prompt = str(request.get("prompt", ""))
        with self.server.lock:
            self.server.requests.append(request)
            serial = len(self.server.requests)
        if "[slow]" in prompt:
            time.sleep(self.server.slow_seconds)
        if "[error]" in prompt:
            return self._send(500, b'{"error": "scripted"}')
        if "[garbage]" in prompt:
            body = b"<html>not json" if serial % 2 else b'{"choices": [{"text": "maybe"}]}'
            return self._send(200, body)
        choice = (request.get("structured_outputs") or {}).get("choice")
        if choice and "A" not in choice:  # a pointwise score: "7" or "9", equally likely
            top = {"7": math.log(0.5), "9": math.log(0.5)}
            body = {"choices": [{"text": "7", "logprobs": {"top_logprobs": [top]}}]}
            return self._send(200, json.dumps(body).encode())
        if request.get("max_tokens") == 1:
            return self._send(200, json.dumps(verdict(prompt)).encode())
        return self._send(200, json.dumps({"choices": [{"text": "a plain answer"}]}).encode())


class FakeJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, slow_seconds: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def fake_judge(slow_seconds: float = 2.0) -> Iterator[FakeJudge]:
    server = FakeJudge(slow_seconds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
