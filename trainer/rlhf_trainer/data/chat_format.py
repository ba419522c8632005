"""Render a chat into one prompt string, with the judge model's own chat template.

The judge client renders prompts itself and sends them to `/v1/completions`, which vLLM and
lmdeploy serve alike; the chat routes would refuse a model without a template (vLLM) or pick
a template by model name (lmdeploy). The template comes, in order of preference, from
`judge.chatTemplate`, the model's `chat_template.jinja` or `tokenizer_config.json`, or else the
plain Human/Assistant transcript of HH-RLHF.

Templates run in a sandboxed Jinja environment configured like transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a non-escaping `tojson`). Torch-free.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from rlhf_trainer.config import ModelSource, resolve_path
from rlhf_trainer.errors import UserError

if TYPE_CHECKING:
    import jinja2

Role = Literal["system", "user", "assistant", "tool"]


class Message(TypedDict):
    role: Role
    content: str


PLAIN_ROLES: dict[str, str] = {
    "system": "",
    "user": "\n\nHuman: ",
    "assistant": "\n\nAssistant: ",
    "tool": "\n\nHuman: ",
}
PLAIN_GENERATION_PROMPT = "\n\nAssistant:"


@dataclass(frozen=True)
class ChatFormat:
    """A chat template (None: the plain transcript) and the special tokens it may use."""

    template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, keep_bos: bool = False
    ) -> str:
        """The prompt text for a completion that continues as the assistant.

        A leading BOS is dropped unless `keep_bos` (or the template writes that token again
        later, as ChatML templates whose BOS is <|im_start|> do): servers add it when they
        tokenize a completion prompt. The trainer keeps it and tokenizes without special tokens, as
        vLLM's chat route does, since whether a tokenizer adds a BOS is not in its files.
        """
        if self.template is None:
            plain = "".join(PLAIN_ROLES[m["role"]] + m["content"] for m in messages)
            if add_generation_prompt:
                plain += PLAIN_GENERATION_PROMPT
            return plain.lstrip("\n")
        text = _compile(self.template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        bos = self.bos_token
        # ChatML models may name their turn opener (<|im_start|>) as the BOS: that one is the
        # template's own markup, not a BOS a server adds back, so it stays.
        if not keep_bos and bos and text.startswith(bos) and bos not in text[len(bos) :]:
            text = text[len(bos) :]
        return text


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise UserError(
            f"judge chat template: not valid Jinja ({err.message}, line {err.lineno}); fix "
            "judge.chatTemplate or the model's chat_template"
        ) from None


def _token(value: Any) -> str:
    """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _template_from(config: dict[str, Any], jinja_file: str | None) -> str | None:
    if jinja_file is not None:
        return jinja_file
    raw = config.get("chat_template")
    if isinstance(raw, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        raw = named.get("default")
    return raw if isinstance(raw, str) and raw.strip() else None


def _read_files(source: ModelSource) -> tuple[dict[str, Any], str | None]:
    """tokenizer_config.json (parsed) and chat_template.jinja (text) of a model, if present."""
    if source.path is not None:
        folder = resolve_path(source.path)
        files = {n: folder / n for n in ("tokenizer_config.json", "chat_template.jinja")}
        texts = {n: p.read_text() if p.is_file() else None for n, p in files.items()}
    else:
        texts = {n: _hub_text(source, n) for n in ("tokenizer_config.json", "chat_template.jinja")}
    raw = texts["tokenizer_config.json"]
    try:
        config = json.loads(raw) if raw else {}
    except ValueError:
        config = {}
    return (config if isinstance(config, dict) else {}), texts["chat_template.jinja"]


def _hub_text(source: ModelSource, filename: str) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    assert source.name is not None
    try:
        path = hf_hub_download(source.name, filename, revision=source.revision)
    except EntryNotFoundError:
        return None
    return Path(path).read_text()


def load_chat_format(source: ModelSource, override: str | None = None) -> ChatFormat:
    """The chat format of a judge model: `override`, else its own template, else plain."""
    config, jinja_file = _read_files(source)
    template = override if override is not None else _template_from(config, jinja_file)
    fmt = ChatFormat(template, _token(config.get("bos_token")), _token(config.get("eos_token")))
    if template is not None:
        _compile(template)  # a broken template fails the stage before any request
    return fmt
