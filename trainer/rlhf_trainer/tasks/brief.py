"""A task for a real instruct model: answer open questions briefly.

SmolLM2-135M-Instruct answers "Tell me about volcanoes." with paragraphs. The reward `brief`
scores a response 1 up to `SHORT` words, falling linearly to 0 at `LONG` words, and 0 when empty,
so the untouched model's greedy answers score near 0 when they run on, and a policy that learned
to answer in one sentence scores near 1. It is a verifiable reward for GRPO and a yardstick for
DPO and PPO, whose preference data `write_data` builds from the model's own answers: the chosen
response is the answer's first sentence, the rejected one its first three sentences.

`write_data(model_dir, out_dir)` writes chat-format datasets (TRL's conversational rows):
- `brief_sft.jsonl`: {"messages": [user, assistant (first sentence)]};
- `brief_pairs.jsonl`: {"prompt": [user], "chosen": [assistant], "rejected": [assistant]};
- `brief_prompts.jsonl` / `brief_eval.jsonl`: {"prompt": [user]}, train and held-out topics.
The reward functions are torch-free; `write_data` loads the model (transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SHORT, LONG = 20, 40  # words: full reward up to SHORT, none from LONG
LONG_SENTENCES = 3  # the rejected answer: the model's own, cut after this many sentences

TOPICS: tuple[str, ...] = (
    "volcanoes", "the moon", "honey bees", "chess", "the ocean", "rainbows", "bicycles",
    "the Roman Empire", "photosynthesis", "penguins", "jazz music", "the internet",
    "earthquakes", "coffee", "the pyramids", "electricity", "sharks", "gardening",
    "the human heart", "airplanes", "glaciers", "the printing press", "dinosaurs", "tea",
    "solar panels", "the Amazon rainforest", "whales", "the violin", "deserts", "vaccines",
    "the Eiffel Tower", "owls", "recycling", "mountains", "the piano", "clouds",
    "the Olympic Games", "bread", "elephants", "satellites", "coral reefs", "the compass",
    "butterflies", "chocolate", "lighthouses", "the brain", "trains", "forests",
    "the telescope", "wolves", "rivers", "soap", "the calendar", "tigers", "cheese",
    "the alphabet", "snow", "bridges", "museums", "the camera",
)
ASKS: tuple[str, ...] = (
    "Tell me about {}.",
    "Explain {} to me.",
    "What do you know about {}?",
    "Describe {}.",
)
HELD_OUT = 12  # the last topics: prompts never trained on


def words(text: str) -> int:
    return len(text.split())


def brief(prompt: str, response: str) -> float:
    """1 for a non-empty answer of at most SHORT words, linearly less to 0 at LONG words."""
    del prompt
    n = words(response)
    if n == 0:
        return 0.0
    return max(0.0, min(1.0, (LONG - n) / (LONG - SHORT)))


def first_sentence(text: str) -> str:
    """The answer's first sentence (the whole text when it has no sentence end)."""
    match = re.search(r"^(.+?[.!?])(\s|$)", text.strip(), flags=re.S)
    return match.group(1).strip() if match else text.strip()


def sentences(text: str, count: int) -> str:
    """The first `count` sentences (the rejected, long answer: kept short enough to train fast)."""
    parts = re.findall(r".+?[.!?](?:\s+|$)", " ".join(text.split()))
    return "".join(parts[:count]).strip() if parts else text.strip()


def prompts(held_out: bool) -> list[str]:
    topics = TOPICS[-HELD_OUT:] if held_out else TOPICS[:-HELD_OUT]
    return [ask.format(t) for t in topics for ask in ASKS]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def answers(model_dir: Path, questions: list[str], max_new_tokens: int = 96) -> list[str]:
    """The model's own greedy answers, decoded without special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(questions), 16):
        texts = [
            tokenizer.apply_chat_template(_user(q), tokenize=False, add_generation_prompt=True)
            for q in questions[start : start + 16]
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        width = enc["input_ids"].shape[1]
        out += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in ids]
    return out


def write_data(model_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write the task's chat datasets into `out_dir` (skipped when they are there already)."""
    names = ("brief_sft", "brief_pairs", "brief_prompts", "brief_eval")
    paths = {n: out_dir / f"{n}.jsonl" for n in names}
    if all(p.is_file() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    train = prompts(held_out=False)
    long = answers(model_dir, train)
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for question, whole in zip(train, long, strict=True):
        short, answer = first_sentence(whole), sentences(whole, LONG_SENTENCES)
        rows["brief_prompts"].append({"prompt": _user(question)})
        if words(short) >= words(answer) or not short:
            continue  # a one-sentence answer is already brief: no pair to learn from
        rows["brief_sft"].append({"messages": [*_user(question), *_assistant(short)]})
        rows["brief_pairs"].append(
            {"prompt": _user(question), "chosen": _assistant(short), "rejected": _assistant(answer)}
        )
    rows["brief_eval"] = [{"prompt": _user(q)} for q in prompts(held_out=True)]
    for name, path in paths.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        tmp.replace(path)
    return paths


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the brief-answers chat datasets.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args()
    for path in write_data(args.model_dir, args.out_dir).values():
        print(f"Wrote {path} ({sum(1 for _ in path.open())} rows)")


if __name__ == "__main__":
    main()
