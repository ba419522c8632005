"""EnvironmentClient against a real `http.server` in a thread that answers with scripted
replies: each way a reply can break the protocol drops the episode with its reason."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rlhf_trainer.environments.client import (
    DROP_REASONS,
    EnvironmentClient,
    EnvironmentUnavailable,
    EpisodeDropped,
    Reset,
    Step,
)

pytestmark = pytest.mark.unit

OPENING = [{"role": "user", "content": "Guess."}]
RESULT = [{"role": "tool", "content": "RESULT: 4"}]
GOOD_RESET = {"session": "s1", "messages": OPENING}
GOOD_STEP = {"messages": RESULT, "reward": 0.5, "done": False}


@dataclass
class Script:
    """What the server answers next: status, raw body, and whether to hang or hang up."""

    status: int = 200
    body: bytes = b"{}"
    hang: bool = False  # wait for `release` before answering (a reply later than the timeout)
    hang_up: bool = False  # close the connection without a reply
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def answer(self, payload: Any, status: int = 200) -> None:
        self.status, self.body = status, json.dumps(payload).encode()


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 would stall the concurrent test on SYN retries
    script: Script

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the late reply of the timeout test goes to a client that has hung up


class Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self._answer(json.loads(self.rfile.read(length)))

    def _answer(self, payload: Any) -> None:
        script = self.server.script
        script.requests.append((self.command, self.path, payload))
        if script.hang:
            script.release.wait(10)
        if script.hang_up:
            self.close_connection = True
            return
        self.send_response(script.status)
        self.send_header("Content-Length", str(len(script.body)))
        self.end_headers()
        self.wfile.write(script.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def httpd() -> Iterator[ScriptedServer]:
    server = ScriptedServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def server(httpd: ScriptedServer) -> Iterator[tuple[str, Script]]:
    """The server's URL and a fresh script for this test."""
    httpd.script = script = Script()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    script.release.set()  # a hanging handler answers (to nobody) and its thread ends


@pytest.fixture
def closed_url() -> str:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def client(*urls: str, timeout: float = 5.0, startup: float = 5.0) -> EnvironmentClient:
    return EnvironmentClient(list(urls), timeout_seconds=timeout, startup_timeout_seconds=startup)


def dropped(call: Any, reason: str, *, match: str) -> EpisodeDropped:
    with pytest.raises(EpisodeDropped, match=match) as info:
        call()
    assert info.value.reason == reason
    assert reason in DROP_REASONS
    return info.value


def test_reset_and_step(server: tuple[str, Script]) -> None:
    url, script = server
    env = client(url + "/")
    script.answer(GOOD_RESET)
    assert env.reset(0, {"secret": 3}, 7) == Reset("s1", OPENING)
    script.answer({**GOOD_STEP, "extra": "ignored"})
    assert env.step(0, "s1", "CALC: 2 + 2") == Step(RESULT, 0.5, False)
    script.answer({"messages": [], "reward": None, "done": True})
    assert env.step(0, "s1", "4") == Step([], None, True)
    script.answer({"messages": [], "reward": 1, "done": True})
    step = env.step(0, "s1", "4")
    assert step.reward == 1.0 and isinstance(step.reward, float)
    turn = {"role": "assistant", "content": "CALC: 2 + 2"}
    assert script.requests[:2] == [
        ("POST", "/reset", {"row": {"secret": 3}, "seed": 7}),
        ("POST", "/step", {"session": "s1", "message": turn}),
    ]


def test_non_200_is_http_status(server: tuple[str, Script]) -> None:
    url, script = server
    script.answer({"error": "unknown session 's1'"}, status=400)
    err = dropped(lambda: client(url).step(0, "s1", "5"), "http_status", match="HTTP 400")
    assert f"{url}/step" in str(err) and "unknown session" in str(err)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"reward": 1.0, "done": true}', "`messages` must be a list"),
        (b'{"messages": "hi", "reward": 1.0, "done": true}', "`messages` must be a list"),
        (b'{"messages": ["hi"], "reward": 1.0, "done": true}', r"messages\[0\]"),
        (b'{"messages": [{"role": "user"}], "reward": 0, "done": true}', r"messages\[0\]"),
        (b'{"messages": [{"role": "user", "content": 5}], "reward": 0, "done": true}', "content"),
        (b'{"messages": [{"role": "assistant", "content": "x"}], "reward": 0, "done": true}',
         r"messages\[0\].*system\|user\|tool"),
        (b'{"messages": [{"role": "robot", "content": "x"}], "reward": 0, "done": true}',
         r"messages\[0\]"),
        (b'{"messages": [], "reward": NaN, "done": false}', "`reward` must be finite"),
        (b'{"messages": [], "reward": Infinity, "done": false}', "`reward` must be finite"),
        (b'{"messages": [], "reward": "1.0", "done": false}', "`reward` must be a number"),
        (b'{"messages": [], "reward": true, "done": false}', "`reward` must be a number"),
        (b'{"messages": [], "reward": 1.0}', "`done` must be true or false"),
        (b'{"messages": [], "reward": 1.0, "done": "true"}', "`done` must be true or false"),
        (b'{"messages": [], "reward": 1.0, "done": 1}', "`done` must be true or false"),
    ],
)  # fmt: skip
def test_malformed_step_replies(server: tuple[str, Script], body: bytes, match: str) -> None:
    url, script = server
    script.body = body
    err = dropped(lambda: client(url).step(0, "s1", "5"), "malformed", match=match)
    assert str(err).startswith(f"POST {url}/step: ")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"messages": OPENING}, "`session` must be a non-empty string"),
        ({"session": "", "messages": OPENING}, "`session` must be a non-empty"),
        ({"session": 12, "messages": OPENING}, "`session` must be a non-empty"),
        ({"session": "s1"}, "`messages` must be a list"),
        ({"session": "s1", "messages": []}, "`messages` is empty"),
    ],
)
def test_malformed_reset_replies(
    server: tuple[str, Script], payload: dict[str, Any], match: str
) -> None:
    url, script = server
    script.answer(payload)
    dropped(lambda: client(url).reset(0, {}, 0), "malformed", match=match)


def test_a_reply_later_than_the_timeout(server: tuple[str, Script]) -> None:
    url, script = server
    script.answer(GOOD_STEP)
    script.hang = True
    err = dropped(lambda: client(url, timeout=0.2).step(0, "s1", "5"), "timeout", match="0.2s")
    assert f"{url}/step" in str(err)


def test_a_closed_port_is_connection(closed_url: str) -> None:
    err = dropped(lambda: client(closed_url).reset(0, {}, 0), "connection", match="refused")
    assert f"{closed_url}/reset" in str(err)


def test_a_server_that_hangs_up_is_connection(server: tuple[str, Script]) -> None:
    url, script = server
    script.hang_up = True
    dropped(lambda: client(url).step(0, "s1", "5"), "connection", match=f"{url}/step")


def test_replica_picks_its_url(server: tuple[str, Script], closed_url: str) -> None:
    url, script = server
    env = client(closed_url, url)
    script.answer(GOOD_RESET)
    assert env.reset(1, {}, 0).session == "s1"
    assert env.reset(3, {}, 0).session == "s1"
    dropped(lambda: env.reset(2, {}, 0), "connection", match=closed_url)
    assert env.url(5) == url


def test_latencies_are_taken_once(server: tuple[str, Script], closed_url: str) -> None:
    url, script = server
    env = client(url, closed_url)
    script.answer(GOOD_STEP)
    with ThreadPoolExecutor(8) as pool:
        steps = list(pool.map(lambda i: env.step(0, f"s{i}", "5"), range(32)))
    assert all(step.reward == 0.5 for step in steps)
    with pytest.raises(EpisodeDropped):
        env.step(1, "s1", "5")  # a failed request is timed too
    latencies = env.take_latencies()
    assert len(latencies) == 33 and all(seconds >= 0 for seconds in latencies)
    assert env.take_latencies() == []


def test_wait_healthy(server: tuple[str, Script]) -> None:
    url, script = server
    client(url, url + "/").wait_healthy()
    assert script.requests[0] == ("GET", "/health", None)


def test_wait_healthy_names_every_url_that_did_not_answer(
    server: tuple[str, Script], closed_url: str
) -> None:
    url, script = server
    script.answer({"error": "loading"}, status=503)
    with pytest.raises(EnvironmentUnavailable) as info:
        client(closed_url, url, startup=0.3).wait_healthy()
    message = str(info.value)
    assert "not healthy after 0.3s" in message
    assert f"{closed_url}/health (connection refused)" in message
    assert f"{url}/health (HTTP 503)" in message
    assert "startupTimeoutSeconds" in message


@pytest.mark.parametrize(
    ("urls", "timeout"), [([], 1.0), (["localhost:8000"], 1.0), (["http://h:1"], 0.0)]
)
def test_constructor_refuses_bad_arguments(urls: list[str], timeout: float) -> None:
    with pytest.raises(ValueError):
        EnvironmentClient(urls, timeout_seconds=timeout, startup_timeout_seconds=1.0)
