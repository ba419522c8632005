"""Multi-turn episodes (rlhf_trainer.online.episodes) against a real environment server (the
calculator, served in a thread): the loss mask holds exactly the tokens the policy generated in
each assistant turn, for a transcript with tool and user turns between them, and the
transcript's tokens are those of the whole conversation rendered once by SmolLM2's template."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from rlhf_trainer.config import ModelSource
from rlhf_trainer.data.chat_format import load_chat_format
from rlhf_trainer.environments.client import EnvironmentClient
from rlhf_trainer.environments.server import make_server
from rlhf_trainer.online.episodes import EpisodeRunner, EpisodeSettings, Transcript
from rlhf_trainer.online.experience import collate_samples
from rlhf_trainer.rollout.client import RolloutError, Sample, Sampling

pytestmark = pytest.mark.unit

ROW = {"prompt": "calc", "question": "What is 2 + 3 * 4?", "answer": 14}
# Each assistant turn of the scripted policy: a tool call, a reply the calculator does not
# understand (it answers with a user reminder), then the answer.
TURNS = ["CALC: 2 + 3 * 4", "Let me think.", "ANSWER: 14"]


@pytest.fixture(scope="module")
def calculator_url() -> Iterator[str]:
    server = make_server("calculator", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()


class ScriptedPolicy:
    """A generator that answers turn k of every episode with TURNS[k] and <|im_end|>, each
    token's logprob -(its position + 1) so that a test can tell them apart."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.calls: list[list[list[int]]] = []

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, urls: Any = None
    ) -> list[list[Sample]]:
        turn = len(self.calls)
        self.calls.append([list(p) for p in prompts])
        ids = self.tokenizer(TURNS[turn], add_special_tokens=False)["input_ids"] + [self.end]
        logprobs = tuple(-(i + 1.0) for i in range(len(ids)))
        return [[Sample(i, tuple(p), tuple(ids), logprobs, "stop")] for i, p in enumerate(prompts)]

    def probe(self, prompt: Sequence[int], max_tokens: int, url: str) -> Sample:
        raise NotImplementedError


def test_the_loss_mask_is_exactly_the_generated_tokens_of_every_turn(
    smollm2: Path, calculator_url: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = load_chat_format(ModelSource(path=str(smollm2)))
    runner = EpisodeRunner(
        EnvironmentClient([calculator_url], 10.0, 10.0),
        Transcript(chat, tokenizer),
        EpisodeSettings(max_turns=4, max_length=512, concurrency=4),
    )
    policy = ScriptedPolicy(tokenizer)
    sampling = Sampling(n=2, max_tokens=32, temperature=1.0)
    prompts, samples, metrics = runner.play([ROW], seed=7, n=2, generator=policy, sampling=sampling)

    assert len(samples) == 2 and len(policy.calls) == 3  # 3 turns, both episodes per call
    assert all(len(call) == 2 for call in policy.calls)
    sample = samples[0]
    assert sample.reward == 1.0 and metrics["episode_reward"] == 1.0
    assert metrics["episode_turns"] == 3.0 and metrics["episodes_dropped_timeout"] == 0.0
    assert prompts[0].endswith("What is 2 + 3 * 4?<|im_end|>\n<|im_start|>assistant\n")

    # The transcript is the whole conversation rendered once (its final "\n" after <|im_end|>
    # is the template's, written after the episode ends).
    messages = [
        {"role": "system", "content": chat_system(prompts[0])},
        {"role": "user", "content": ROW["question"]},
        {"role": "assistant", "content": TURNS[0]},
        {"role": "tool", "content": "RESULT: 14"},
        {"role": "assistant", "content": TURNS[1]},
        {"role": "user", "content": sample_reminder(tokenizer, sample)},
        {"role": "assistant", "content": TURNS[2]},
    ]
    whole = chat.render(messages, add_generation_prompt=False, keep_bos=True).removesuffix("\n")
    ids = list(sample.prompt_ids + sample.response_ids)
    assert ids == tokenizer(whole, add_special_tokens=False)["input_ids"]

    # The mask: 1 exactly on each turn's generated tokens, at the places they were generated.
    assert sample.trained_mask is not None
    trained = [t for t, m in zip(sample.response_ids, sample.trained_mask, strict=True) if m]
    expected: list[int] = []
    for turn, call in zip(TURNS, policy.calls, strict=True):
        generated = tokenizer(turn, add_special_tokens=False)["input_ids"] + [policy.end]
        start = len(call[0]) - len(sample.prompt_ids)  # where the turn began in the response
        mask = sample.trained_mask[start : start + len(generated)]
        assert list(sample.response_ids[start : start + len(generated)]) == generated
        assert all(mask), turn
        assert list(sample.logprobs[start : start + len(generated)]) == [
            -(i + 1.0) for i in range(len(generated))
        ]
        expected += generated
    assert trained == expected  # nothing the environment wrote is trained
    untrained = [lp for lp, m in zip(sample.logprobs, sample.trained_mask, strict=True) if not m]
    assert untrained and all(lp == 0.0 for lp in untrained)

    batch = collate_samples(samples, int(tokenizer.pad_token_id), device=torch_cpu())
    r = len(sample.response_ids)
    assert batch.response_mask[0, :r].tolist() == [float(m) for m in sample.trained_mask]
    assert int(batch.attention_mask[0].sum()) == len(ids)


def chat_system(prompt: str) -> str:
    return prompt.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]


def sample_reminder(tokenizer: Any, sample: Sample) -> str:
    text = tokenizer.decode(list(sample.response_ids))
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def torch_cpu() -> Any:
    import torch

    return torch.device("cpu")


class BrokenStep(BaseHTTPRequestHandler):
    """An environment whose /reset works and whose /step answers 500."""

    def do_GET(self) -> None:
        self._send(200, b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/reset":
            body = {"session": "s", "messages": [{"role": "user", "content": "Say 1."}]}
            self._send(200, json.dumps(body).encode())
        else:
            self._send(500, b'{"error": "boom"}')

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture(scope="module")
def broken_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenStep)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_dropped_episodes_train_nothing_and_keep_the_group_mean(
    smollm2: Path, calculator_url: str, broken_url: str
) -> None:
    """Episode j of each row runs on replica j: the calculator (solved, reward 1.0) or the
    broken one (dropped at its first /step). A dropped episode is counted by reason, has no
    trained token and its group's mean reward; a step whose episodes are all dropped fails."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    transcript = Transcript(load_chat_format(ModelSource(path=str(smollm2))), tokenizer)
    settings = EpisodeSettings(max_turns=4, max_length=512, concurrency=4)
    sampling = Sampling(n=2, max_tokens=32, temperature=1.0)
    mixed = EpisodeRunner(
        EnvironmentClient([calculator_url, broken_url], 10, 10), transcript, settings
    )
    policy = ScriptedPolicy(tokenizer)
    policy.calls = [[], []]  # every turn answers TURNS[2]: "ANSWER: 14"
    _, samples, metrics = mixed.play([ROW, ROW], seed=0, n=2, generator=policy, sampling=sampling)
    assert metrics["episodes_dropped_http_status"] == 2.0
    assert metrics["episode_reward"] == 1.0
    solved, dropped = samples[0], samples[1]
    assert solved.reward == 1.0 and solved.trained_mask is not None and any(solved.trained_mask)
    assert dropped.reward == 1.0 and dropped.trained_mask is not None
    assert not any(dropped.trained_mask) and dropped.finish_reason == "dropped"

    broken = EpisodeRunner(EnvironmentClient([broken_url], 10, 10), transcript, settings)
    policy = ScriptedPolicy(tokenizer)
    with pytest.raises(RolloutError, match="every episode of the step was dropped"):
        broken.play([ROW], seed=0, n=2, generator=policy, sampling=sampling)
