"""The environment server as users run it: `python -m rlhf_trainer env-serve NAME --port 0` and
`rlhf env serve NAME --port 0` in their own processes, played through EnvironmentClient and
scraped with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import json
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kill_tree import descendants, gone
from rlhf_trainer.environments.client import EnvironmentClient, EpisodeDropped
from rlhf_trainer.environments.server import EnvironmentService, RequestError

pytestmark = pytest.mark.integration

TRAINER = [sys.executable, "-m", "rlhf_trainer", "env-serve"]
OPERATOR = [sys.executable, "-m", "rlhf_operator.cli", "env", "serve"]
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"


def start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a server and read its URL from the one line it prints when ready."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout=30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("Serving environment "):
        proc.kill()
        pytest.fail(f"{argv} did not print its URL: {line!r} {proc.communicate()[1]}")
    url = line.split(" at ")[1].strip()
    assert not url.endswith(":0")
    return proc, url


def stop(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> str:
    """Signal the server; it must exit 0 within seconds and leave no process behind."""
    children = descendants(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert all(gone(pid) for pid in children)
    return err


@pytest.fixture(scope="module")
def guess_server() -> Iterator[str]:
    """One server for the module: the tests that count compare the metrics before and after."""
    proc, url = start([*TRAINER, "guess", "--port", "0", "--host", "127.0.0.1"])
    yield url
    if proc.poll() is None:
        stop(proc)


def request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        raw = response.read()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(raw) if "json" in kind else raw.decode()
    finally:
        connection.close()


def metrics(url: str, env: str = "guess") -> dict[str, float]:
    """Each sample as exposed, after prometheus_client's parser has read the page (it names a
    counter's family without `_total`, and its samples with it)."""
    status, text = request(url, "GET", "/metrics")
    assert status == 200
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert kinds == {
        "rlhf_env_episodes": "counter",
        "rlhf_env_steps": "counter",
        "rlhf_env_episode_reward_sum": "counter",
        "rlhf_env_sessions": "gauge",
    }
    out = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            sample, value = line.split(" ")
            name, labels = sample.split("{")
            assert labels == f'env="{env}"}}'
            out[name] = float(value)
    return out


def play_guess(client: EnvironmentClient, replica: int, secret: int) -> tuple[float, int]:
    """Bisect with the hints to `secret`: (the episode's reward, its turns)."""
    opened = client.reset(replica, {"secret": secret, "low": 1, "high": 100}, seed=replica)
    assert "from 1 to 100" in opened.messages[0]["content"]
    low, high, total = 1, 100, 0.0
    for turn in range(1, 8):
        pick = (low + high) // 2
        step = client.step(replica, opened.session, f"My guess is {pick}!")
        total += step.reward or 0.0
        if step.done:
            return total, turn
        hint = step.messages[0]["content"]
        low, high = (pick + 1, high) if hint == "Higher." else (low, pick - 1)
    raise AssertionError("bisection took more than 7 turns")


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after}


def test_a_whole_guess_episode(guess_server: str) -> None:
    client = EnvironmentClient([guess_server], timeout_seconds=10, startup_timeout_seconds=30)
    client.wait_healthy()
    before = metrics(guess_server)
    reward, turns = play_guess(client, 0, secret=37)
    assert reward == pytest.approx(1.0)
    assert turns > 1
    assert len(client.take_latencies()) == turns + 1
    assert delta(before, metrics(guess_server)) == {
        "rlhf_env_episodes_total": 1.0,
        "rlhf_env_steps_total": float(turns),
        "rlhf_env_episode_reward_sum": pytest.approx(1.0),
        "rlhf_env_sessions": 0.0,
    }
    with pytest.raises(EpisodeDropped, match="unknown session") as info:  # it ended with done
        client.step(0, "0" * 32, "5")
    assert info.value.reason == "http_status"


def test_concurrent_episodes(guess_server: str) -> None:
    client = EnvironmentClient([guess_server], timeout_seconds=10, startup_timeout_seconds=30)
    before = metrics(guess_server)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: play_guess(client, i, secret=1 + i), range(64)))
    assert all(reward == pytest.approx(1.0) for reward, _ in results)
    client.reset(0, {}, seed=1)  # left open: the trainer stops at maxTurns without `done`
    assert delta(before, metrics(guess_server)) == {
        "rlhf_env_episodes_total": 65.0,
        "rlhf_env_steps_total": float(sum(turns for _, turns in results)),
        "rlhf_env_episode_reward_sum": pytest.approx(64.0),
        "rlhf_env_sessions": 1.0,
    }


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/reset", b"{not json", "not JSON"),
        ("/reset", b"\xff", "not JSON"),
        ("/reset", b"[1]", "JSON object"),
        ("/reset", b'{"row": {}}', "`seed` must be an integer"),
        ("/reset", b'{"row": {}, "seed": "1"}', "`seed` must be an integer"),
        ("/reset", b'{"row": [1], "seed": 1}', "`row` must be a JSON object"),
        ("/reset", b'{"row": {"secret": "x"}, "seed": 1}', "row field 'secret'"),
        ("/step", b'{"session": "nope", "message": {"role": "assistant", "content": "5"}}',
         "unknown session 'nope'"),
        ("/step", b'{"session": "nope", "message": {"role": "user", "content": "5"}}',
         '"role": "assistant"'),
        ("/step", b'{"message": {"role": "assistant", "content": "5"}}', "`session` must be"),
    ],
)  # fmt: skip
def test_malformed_requests_get_400(guess_server: str, path: str, body: bytes, error: str) -> None:
    status, reply = request(guess_server, "POST", path, body)
    assert status == 400
    assert error in reply["error"]


def test_metrics_match_the_contract(guess_server: str) -> None:
    """docs/METRICS.md's Environments table: each name, type and label, and nothing else."""
    section = METRICS_DOC.read_text().split("## Environments", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("rlhf_env_"):
            documented[cells[0]] = (cells[1], cells[2])
    _, text = request(guess_server, "GET", "/metrics")
    kinds = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
    assert {name: (kind, "env") for name, kind in kinds.items()} == documented
    assert set(metrics(guess_server)) == set(documented)


def test_sessions_are_bounded() -> None:
    service = EnvironmentService("guess", max_sessions=3)
    sessions = [service.reset({"row": {"secret": 2}, "seed": 0})["session"] for _ in range(5)]
    step = {"role": "assistant", "content": "2"}
    with pytest.raises(RequestError, match="unknown session"):  # the oldest went first
        service.step({"session": sessions[1], "message": step})
    assert service.step({"session": sessions[2], "message": step})["done"] is True
    assert 'rlhf_env_sessions{env="guess"} 2\n' in service.metrics()


def test_unknown_paths_get_404(guess_server: str) -> None:
    assert request(guess_server, "GET", "/nope")[0] == 404
    status, reply = request(guess_server, "POST", "/health", b"{}")
    assert status == 404 and "POST /reset or /step" in reply["error"]
    assert request(guess_server, "GET", "/health") == (200, {"status": "ok", "env": "guess"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server(sig: signal.Signals) -> None:
    proc, url = start([*TRAINER, "guess", "--port", "0", "--host", "127.0.0.1"])
    client = EnvironmentClient([url], timeout_seconds=10, startup_timeout_seconds=30)
    client.wait_healthy()
    assert "Stopped environment guess" in stop(proc, sig)
    with pytest.raises(EpisodeDropped) as info:
        client.reset(0, {}, seed=0)
    assert info.value.reason == "connection"


def test_rlhf_env_serve_calculator() -> None:
    proc, url = start([*OPERATOR, "calculator", "--port", "0", "--host", "127.0.0.1"])
    try:
        client = EnvironmentClient([url], timeout_seconds=10, startup_timeout_seconds=30)
        client.wait_healthy()
        opened = client.reset(0, {"question": "What is 17 * 23 + 4?", "answer": 395}, seed=0)
        assert [m["role"] for m in opened.messages] == ["system", "user"]
        step = client.step(0, opened.session, "CALC: 17 * 23 + 4")
        assert (step.messages, step.reward, step.done) == (
            [{"role": "tool", "content": "RESULT: 395"}], 0.0, False,
        )  # fmt: skip
        step = client.step(0, opened.session, "ANSWER: 395")
        assert (step.reward, step.done) == (1.0, True)
    finally:
        stop(proc)  # exec'd: the signal reaches the server itself, not a wrapper


def test_unknown_environment_is_one_error_line() -> None:
    proc = subprocess.run([*OPERATOR, "chess", "--port", "0"], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown environment 'chess'; the environments are: calculator, guess"
    ]
    assert proc.stdout == ""
