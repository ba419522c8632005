"""A local HTTP server that plays a vLLM rollout server's side of the protocol and records every
request: the control routes of the weight sync (disk and nccl), `/get_world_size`, and
`/v1/completions` (each choice samples token ids 7, 8, 9, ... with logprob -1). It lets tests
check what the trainer's client sends, in which order and how concurrently, with no vLLM.

`reply` replaces the completions answer (fuzz tests): given the request body it returns
(status, body bytes), ("drop", b"") to close the connection without a reply, or
("truncate", body) to send a Content-Length longer than the body and close."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    started: float
    finished: float = 0.0


@dataclass
class FakeServer:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    world_size: int = 1
    completion_delay_s: float = 0.0
    fail_status: dict[str, int] = field(default_factory=dict)  # path -> HTTP status
    # path -> event the reply waits for (5 s, then HTTP 500), like vLLM's init, which returns
    # only once the trainer has joined the NCCL group
    gates: dict[str, threading.Event] = field(default_factory=dict)
    reply: Callable[[Any], tuple[int | str, bytes]] | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def control_paths(self) -> list[str]:
        return [r.path for r in self.requests if not r.path.startswith("/v1/")]


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self, body: Any) -> Recorded:
            rec = Recorded(self.command, self.path, body, time.monotonic())
            with state.lock:
                state.requests.append(rec)
            return rec

        def do_GET(self) -> None:
            rec = self._record(None)
            if self.path.startswith("/get_world_size"):
                self._reply(200, {"world_size": state.world_size})
            elif self.path in ("/health", "/v1/models"):
                self._reply(200, {"data": [{"id": "policy"}]})
            else:
                self._reply(404, {"detail": "Not Found"})
            rec.finished = time.monotonic()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            rec = self._record(json.loads(raw) if raw else None)
            route = self.path.split("?")[0]
            gate = state.gates.get(route)
            if gate is not None and not gate.wait(timeout=5):
                self._reply(500, {"detail": "the trainer never joined"})
            elif route in state.fail_status:
                self._reply(state.fail_status[route], {"detail": "injected failure"})
            elif route == "/v1/completions" and state.reply is not None:
                self._scripted(*state.reply(rec.body))
            elif route == "/v1/completions":
                self._complete(rec.body)
            else:
                self._reply(200, {"status": "ok"})
            rec.finished = time.monotonic()

        def _scripted(self, status: int | str, data: bytes) -> None:
            if status == "drop":
                self.close_connection = True
                return
            self.send_response(200 if status == "truncate" else int(status))
            self.send_header("Content-Type", "application/json")
            extra = 10 if status == "truncate" else 0
            self.send_header("Content-Length", str(len(data) + extra))
            self.close_connection = True
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (a timeout under test)

        def _complete(self, body: dict[str, Any]) -> None:
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            time.sleep(state.completion_delay_s)
            n, length = int(body.get("n", 1)), int(body.get("max_tokens", 3))
            choices = [
                {
                    "index": i,
                    "text": "x" * length,
                    "finish_reason": "length",
                    "logprobs": {
                        "tokens": [f"token_id:{7 + i + t}" for t in range(length)],
                        "token_logprobs": [-1.0] * length,
                    },
                }
                for i in range(n)
            ]
            with state.lock:
                state.in_flight -= 1
            self._reply(200, {"choices": choices})

    return Handler


@contextmanager
def fake_server(**settings: Any) -> Iterator[FakeServer]:
    state = FakeServer(**settings)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
