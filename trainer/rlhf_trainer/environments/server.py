"""Serve one of `rlhf_trainer.environments.builtin.ENVIRONMENTS` over the environment protocol
(docs/ENVIRONMENTS.md): `GET /health`, `POST /reset`, `POST /step` and `GET /metrics`.

`python -m rlhf_trainer env-serve NAME --port N` (or `rlhf env serve NAME --port N`) runs
`serve`. Standard library only, so the server starts in well under a second with no torch.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from rlhf_trainer.environments.builtin import ENVIRONMENTS, BadRow, Environment
from rlhf_trainer.errors import UserError

MAX_SESSIONS = 10_000
MAX_BODY_BYTES = 1 << 20

log = logging.getLogger("rlhf_trainer.environments.server")


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the `error` of the JSON reply."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    env: Environment
    reward: float = 0.0  # sum of the step rewards so far
    done: bool = False
    # The trainer sends an episode's turns one at a time; this keeps a client that does not
    # from stepping one environment object from two threads.
    lock: threading.Lock = field(default_factory=threading.Lock)


class EnvironmentService:
    """The sessions of one environment and its counters; thread-safe, no HTTP."""

    def __init__(self, name: str, max_sessions: int = MAX_SESSIONS) -> None:
        if name not in ENVIRONMENTS:
            raise ValueError(f"unknown environment {name!r}")
        self.name = name
        self.max_sessions = max_sessions
        self._factory = ENVIRONMENTS[name]
        # Oldest first: an episode the trainer stopped at maxTurns is never `done`, so the
        # bound is what frees it.
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.episodes = 0
        self.steps = 0
        self.reward_sum = 0.0

    def reset(self, body: dict[str, Any]) -> dict[str, Any]:
        row, seed = body.get("row"), body.get("seed")
        if not isinstance(row, dict):
            raise RequestError(400, "`row` must be a JSON object (the dataset row)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RequestError(400, "`seed` must be an integer")
        env = self._factory()
        try:
            messages = env.reset(row, seed)
        except BadRow as err:
            raise RequestError(400, str(err)) from None
        session = uuid.uuid4().hex
        with self._lock:
            self._sessions[session] = Session(env)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            self.episodes += 1
        return {"session": session, "messages": messages}

    def step(self, body: dict[str, Any]) -> dict[str, Any]:
        session_id, message = body.get("session"), body.get("message")
        if not isinstance(session_id, str):
            raise RequestError(400, "`session` must be a string (from /reset)")
        if not (
            isinstance(message, dict)
            and message.get("role") == "assistant"
            and isinstance(message.get("content"), str)
        ):
            raise RequestError(400, '`message` must be {"role": "assistant", "content": "<text>"}')
        with self._lock:
            session = self._sessions.get(session_id)
        unknown = f"unknown session {session_id!r}: never opened, already done, or evicted"
        if session is None:
            raise RequestError(400, unknown)
        with session.lock:
            if session.done:
                raise RequestError(400, unknown)
            result = session.env.step(message["content"])
            session.done = result.done
            session.reward += result.reward or 0.0
        with self._lock:
            self.steps += 1
            if result.done:
                self._sessions.pop(session_id, None)
                self.reward_sum += session.reward
        return {"messages": result.messages, "reward": result.reward, "done": result.done}

    def metrics(self) -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4)."""
        label = '{env="' + self.name.replace("\\", "\\\\").replace('"', '\\"') + '"}'
        with self._lock:
            rows = [
                ("rlhf_env_episodes_total", "counter", "Episodes started (/reset).",
                 self.episodes),
                ("rlhf_env_steps_total", "counter", "Assistant turns answered (/step).",
                 self.steps),
                ("rlhf_env_episode_reward_sum", "counter",
                 "Sum of the rewards of the episodes that ended with done.", self.reward_sum),
                ("rlhf_env_sessions", "gauge", "Open sessions.", len(self._sessions)),
            ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            lines.append(f"{name}{label} {_number(float(value))}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class Handler(BaseHTTPRequestHandler):
    server: EnvHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive for clients that pool connections

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"status": "ok", "env": self.server.service.name})
        elif self.path == "/metrics":
            body = self.server.service.metrics().encode()
            self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._reply(404, {"error": f"no such path {self.path}; see docs/ENVIRONMENTS.md"})

    def do_POST(self) -> None:
        routes = {"/reset": self.server.service.reset, "/step": self.server.service.step}
        route = routes.get(self.path)
        try:
            if route is None:
                raise RequestError(404, f"no such path {self.path}; POST /reset or /step")
            self._reply(200, route(self._body()))
        except RequestError as err:
            self._reply(err.status, {"error": str(err)})
        except Exception as err:  # a bug in the environment: answered, so the client sees why
            log.exception("Failed %s %s", self.command, self.path)
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(400, "the request needs a Content-Length header") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"the body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would flood the log; /metrics counts them


class EnvHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up shutdown
    # socketserver's default backlog of 5 makes the 6th of simultaneous connects (the trainer
    # sends `concurrency` at once) wait for a SYN retransmit: a second or more each.
    request_queue_size = 1024

    def __init__(self, service: EnvironmentService, host: str, port: int) -> None:
        if ":" in host:  # an IPv6 address such as "::"
            self.address_family = socket.AF_INET6
        self.service = service
        super().__init__((host, port), Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (its timeout) before the reply: nothing to report
        log.exception("Failed to answer %s", client_address)

    @property
    def url(self) -> str:
        address, port = self.server_address[0], self.server_address[1]
        host = address if isinstance(address, str) else bytes(address).decode()
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(name: str, host: str, port: int) -> EnvHTTPServer:
    """A bound (not yet serving) server of environment `name`; port 0 takes a free port.
    UserError for an unknown name or an address that cannot be bound."""
    if name not in ENVIRONMENTS:
        names = ", ".join(sorted(ENVIRONMENTS))
        raise UserError(f"unknown environment {name!r}; the environments are: {names}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: give a port from 0 to 65535 (0: any free port)")
    try:
        return EnvHTTPServer(EnvironmentService(name), host, port)
    except OSError as err:
        why = err.strerror or str(err)
        raise UserError(f"--host {host} --port {port}: cannot listen: {why}") from err


def serve(name: str, host: str, port: int) -> None:
    """Serve environment `name` on host:port until SIGTERM or SIGINT, then close cleanly. Prints
    one line with the server's URL (the real port when `port` is 0) once it accepts requests."""
    server = make_server(name, host, port)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, and this handler runs in the thread
        # that runs it: ask from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"Serving environment {name} at {server.url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"Stopped environment {name} at {server.url}", file=sys.stderr, flush=True)
