"""A small client for `/v1/completions` on OpenAI-compatible servers (vLLM, lmdeploy).

Bounded everything: at most `concurrency` requests in flight (over all replicas), each with a
timeout, retried at most `max_retries` times with exponential backoff when the failure may pass
(a timeout, a connection error, 429, 5xx). Every failure ends as a `CallFailed` whose `outcome`
says what happened, so a caller counts it instead of crashing:

- `timeout`: the last attempt timed out;
- `error`: the server could not be reached, or answered with an error status;
- `unparseable`: it answered 200 with something that is not a completion.

Requests go round-robin over the replicas' base URLs. The client counts every failed attempt by
outcome (`failed_attempts`, retried ones included) and, apart, the attempts that lost the
connection (`connection_errors`): a server that was reached again after one may have restarted.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx

from rlhf_trainer.errors import UserError

log = logging.getLogger(__name__)
# httpx logs every request at INFO; a judge stage makes thousands.
logging.getLogger("httpx").setLevel(logging.WARNING)

Failure = Literal["timeout", "error", "unparseable"]
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 8.0


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client of this process. httpx builds a new one for each client
    it makes (about 30 ms: it loads the CA bundle), and a stage makes a client per rollout batch
    and per parity probe."""
    return httpx.create_ssl_context()


class CallFailed(Exception):
    """A request that did not produce a completion; `outcome` classifies it."""

    def __init__(self, outcome: Failure, message: str) -> None:
        super().__init__(message)
        self.outcome: Failure = outcome


@dataclass(frozen=True)
class Completion:
    """One choice of a completion: its text and, when asked for, its logprobs block."""

    text: str
    logprobs: Mapping[str, Any] | None
    finish_reason: str | None


def parse_choices(body: Any) -> list[Completion]:
    """The choices of a `/v1/completions` body; CallFailed("unparseable") if it is not one."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise CallFailed("unparseable", "the reply has no `choices` list")
    out = []
    for choice in choices:
        text = choice.get("text") if isinstance(choice, dict) else None
        if not isinstance(text, str):
            raise CallFailed("unparseable", "a choice has no `text` string")
        logprobs = choice.get("logprobs")
        reason = choice.get("finish_reason")
        out.append(
            Completion(
                text,
                logprobs if isinstance(logprobs, dict) else None,
                reason if isinstance(reason, str) else None,
            )
        )
    return out


class CompletionsClient:
    """`async with CompletionsClient(...) as client: await client.complete({...})`."""

    def __init__(
        self,
        urls: list[str],
        model: str,
        *,
        concurrency: int,
        timeout_s: float,
        max_retries: int,
        backoff_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not urls:
            raise ValueError("CompletionsClient needs at least one server URL")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._urls = itertools.cycle([u.rstrip("/") + "/v1/completions" for u in urls])
        self.failed_attempts: collections.Counter[Failure] = collections.Counter()
        self.connection_errors = 0
        self._slots = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=limits,
            transport=transport,
            verify=tls_context(),
        )

    async def __aenter__(self) -> CompletionsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.aclose()

    async def complete(self, payload: Mapping[str, Any]) -> list[Completion]:
        """POST one completion request (the model name is filled in); its choices."""
        body = {"model": self.model, **payload}
        last: CallFailed | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
            try:
                return await self._attempt(body)
            except _Retryable as err:
                last = err.failure
                self.failed_attempts[err.failure.outcome] += 1
                log.debug("Retrying a completion request (%s)", err.failure)
            except CallFailed as err:
                self.failed_attempts[err.outcome] += 1
                raise
        assert last is not None
        raise last

    async def _attempt(self, body: Mapping[str, Any]) -> list[Completion]:
        url = next(self._urls)
        async with self._slots:
            try:
                response = await self._http.post(url, json=body)
            except httpx.TimeoutException as err:
                raise _Retryable(CallFailed("timeout", f"{url}: timed out ({err!r})")) from None
            except httpx.HTTPError as err:
                if isinstance(err, httpx.TransportError):
                    self.connection_errors += 1
                raise _Retryable(CallFailed("error", f"{url}: {err!r}")) from None
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(CallFailed("error", f"{url}: HTTP {response.status_code}"))
        if response.status_code != 200:
            detail = response.text[:300]
            raise CallFailed("error", f"{url}: HTTP {response.status_code}: {detail}")
        try:
            parsed = response.json()
        except ValueError:
            raise CallFailed("unparseable", f"{url}: the reply is not JSON") from None
        return parse_choices(parsed)


class _Retryable(Exception):
    def __init__(self, failure: CallFailed) -> None:
        super().__init__(str(failure))
        self.failure = failure


def top_logprobs(completion: Completion, position: int = 0) -> dict[str, float]:
    """{token: logprob} at one generated position; {} when absent or malformed.

    Values that cannot be log-probabilities (NaN, positive, not numbers) are left out.
    """
    block = completion.logprobs or {}
    tops = block.get("top_logprobs")
    if not isinstance(tops, list) or len(tops) <= position or not isinstance(tops[position], dict):
        return {}
    out: dict[str, float] = {}
    for token, value in tops[position].items():
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(token, str) and ok and value <= 0.0:  # NaN fails the comparison too
            out[token] = float(value)
    return out


async def wait_ready(urls: list[str], timeout_s: float, poll_s: float = 2.0) -> None:
    """Wait until every server lists its models (its weights are loaded).

    Raises UserError naming the server that did not come up within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), verify=tls_context()) as http:
        for url in urls:
            while True:
                try:
                    if (await http.get(url.rstrip("/") + "/v1/models")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise UserError(
                        f"server {url} did not answer /v1/models within {timeout_s:.0f} s; "
                        "check its pod's log"
                    )
                await asyncio.sleep(poll_s)
