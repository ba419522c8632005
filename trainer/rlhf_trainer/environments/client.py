"""The trainer's client of environment servers (docs/ENVIRONMENTS.md): `/health`, `/reset`
and `/step` over HTTP + JSON, with every reply checked strictly.

A reply that cannot be used drops the episode: `EpisodeDropped` says why (`reason`, one of
`DROP_REASONS`) so the trainer can count drops by reason. Standard library only (`http.client`,
which also ignores `$HTTP_PROXY`: environment traffic stays inside the cluster). Thread-safe:
each request has its own connection, and only the latency list is shared, under a lock.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

DropReason = Literal["timeout", "http_status", "malformed", "connection"]
DROP_REASONS: tuple[DropReason, ...] = ("timeout", "http_status", "malformed", "connection")
REPLY_ROLES = frozenset({"system", "user", "tool"})
HEALTH_POLL_SECONDS = 0.5
T = TypeVar("T")


class EpisodeDropped(Exception):
    """A /reset or /step that failed; the episode is dropped. `reason`: "timeout" (no complete
    reply within the timeout), "http_status" (not 200), "malformed" (the body breaks the
    protocol) or "connection" (refused, reset or closed)."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(message)
        self.reason: DropReason = reason


class EnvironmentUnavailable(Exception):
    """An environment server whose /health did not answer 200 within the startup timeout."""


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class Reset:
    session: str  # the id to pass to every /step of the episode
    messages: list[dict[str, str]]  # the opening messages, at least one


@dataclass(frozen=True)
class Step:
    messages: list[dict[str, str]]  # what the environment adds (user or tool turns), maybe none
    reward: float | None  # None: no reward for this turn
    done: bool


class EnvironmentClient:
    """Client of the environment replicas at `urls`. `replica` picks `urls[replica % len]`:
    an episode's session lives in one server, so all its requests must go to the same one."""

    def __init__(
        self, urls: list[str], timeout_seconds: float, startup_timeout_seconds: float
    ) -> None:
        if not urls:
            raise ValueError("give at least one environment URL")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if timeout_seconds <= 0 or startup_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        self.urls = [url.rstrip("/") for url in urls]
        self.timeout_seconds = timeout_seconds
        self.startup_timeout_seconds = startup_timeout_seconds
        self._latencies: list[float] = []
        self._lock = threading.Lock()

    def url(self, replica: int) -> str:
        return self.urls[replica % len(self.urls)]

    def take_latencies(self) -> list[float]:
        """Seconds taken by each /reset and /step since the last call, answered or not."""
        with self._lock:
            out, self._latencies = self._latencies, []
        return out

    def wait_healthy(self) -> None:
        """Poll every replica's GET /health until each answers 200; EnvironmentUnavailable,
        naming each replica that did not and why, after `startup_timeout_seconds`."""
        deadline = time.monotonic() + self.startup_timeout_seconds
        pending = dict.fromkeys(self.urls, "not tried")
        while True:
            for url in list(pending):
                timeout = min(self.timeout_seconds, 5.0, deadline - time.monotonic())
                try:
                    status, _ = _request("GET", url + "/health", None, max(timeout, 0.05))
                except (OSError, http.client.HTTPException) as err:
                    pending[url] = _describe(err)
                    continue
                if status == 200:
                    del pending[url]
                else:
                    pending[url] = f"HTTP {status}"
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnvironmentUnavailable(_unavailable(pending, self.startup_timeout_seconds))
            time.sleep(min(HEALTH_POLL_SECONDS, left))

    def reset(self, replica: int, row: dict[str, Any], seed: int) -> Reset:
        """Start an episode on `row`; EpisodeDropped if the reply cannot be used."""
        return self._post(replica, "/reset", {"row": row, "seed": seed}, _parse_reset)

    def step(self, replica: int, session: str, text: str) -> Step:
        """Send one assistant turn; EpisodeDropped if the reply cannot be used."""
        message = {"role": "assistant", "content": text}
        return self._post(replica, "/step", {"session": session, "message": message}, _parse_step)

    def _post(
        self, replica: int, path: str, payload: dict[str, Any], parse: Callable[[Any], T]
    ) -> T:
        url = self.url(replica) + path
        data = json.dumps(payload).encode()
        start = time.monotonic()
        try:
            status, raw = _request("POST", url, data, self.timeout_seconds)
        except TimeoutError:
            raise _dropped(
                "timeout", url, f"no reply within {self.timeout_seconds:g}s (timeoutSeconds)"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            raise _dropped("connection", url, _describe(err)) from None
        finally:
            elapsed = time.monotonic() - start
            with self._lock:
                self._latencies.append(elapsed)
        if elapsed > self.timeout_seconds:  # the socket timeout bounds each read, not the sum
            raise _dropped(
                "timeout", url, f"reply took {elapsed:.3g}s, over {self.timeout_seconds:g}s"
            )
        if status != 200:
            text = raw[:300].decode("utf-8", "replace")
            raise _dropped("http_status", url, f"HTTP {status}: {text}")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise _dropped("malformed", url, f"the reply is not JSON: {err}") from None
        try:
            if not isinstance(body, dict):
                raise _Malformed("the reply is not a JSON object")
            return parse(body)
        except _Malformed as err:
            raise _dropped("malformed", url, str(err)) from None


def _parse_reset(body: dict[str, Any]) -> Reset:
    session = body.get("session")
    if not isinstance(session, str) or not session:
        raise _Malformed(f"`session` must be a non-empty string, got {session!r}")
    messages = _messages(body.get("messages"))
    if not messages:
        raise _Malformed("`messages` is empty: an episode must open with a message")
    return Reset(session, messages)


def _parse_step(body: dict[str, Any]) -> Step:
    messages = _messages(body.get("messages"))
    reward, done = body.get("reward"), body.get("done")
    if reward is not None:
        # bool is an int to Python, and NaN passes json.loads: neither is a reward.
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise _Malformed(f"`reward` must be a number or null, got {reward!r}")
        if not math.isfinite(reward):
            raise _Malformed(f"`reward` must be finite, got {reward!r}")
        reward = float(reward)
    if not isinstance(done, bool):
        raise _Malformed(f"`done` must be true or false, got {done!r}")
    return Step(messages, reward, done)


def _dropped(reason: DropReason, url: str, problem: str) -> EpisodeDropped:
    return EpisodeDropped(reason, f"POST {url}: {problem}")


def _request(method: str, url: str, data: bytes | None, timeout: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _Malformed(f"`messages` must be a list, got {type(value).__name__}")
    out = []
    for index, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in REPLY_ROLES or not isinstance(content, str):
            raise _Malformed(
                f"`messages[{index}]` must be {{role: system|user|tool, content: <string>}}, "
                f"got {message!r:.200}"
            )
        out.append({"role": role, "content": content})
    return out


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "no reply (timed out)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return f"{type(err).__name__}: {err}"


def _unavailable(pending: dict[str, str], waited: float) -> str:
    problems = ", ".join(f"{url}/health ({why})" for url, why in pending.items())
    return (
        f"environment server not healthy after {waited:g}s: {problems}; check that the "
        "environment server is running and listening at that URL, and that its GET /health "
        "answers 200 (its logs say why not), or raise startupTimeoutSeconds"
    )
