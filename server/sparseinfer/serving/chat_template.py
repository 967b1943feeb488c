"""A checkpoint's chat template (``tokenizer_config.json``'s ``chat_template``), rendered the way
transformers' ``apply_chat_template`` renders it: Jinja2 in an immutable sandbox, blocks trimmed, loop
controls, ``raise_exception`` and ``tojson``, the tokenizer's special tokens as variables, and the rendered
text encoded without adding special tokens (the template writes its own BOS).

A checkpoint without a template has none here: /v1/chat/completions then refuses with a clear error rather
than inventing a format the model was never trained on.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template failed for these messages (its own ``raise_exception`` or a Jinja error)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: dict[str, str]

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            template = _environment().from_string(self.source)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from None


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The default chat template of the checkpoint in ``model_dir``, or None when it has none."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    special = {}
    for name in _SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken written out: {"content": ..., ...}
            value = value.get("content")
        if isinstance(value, str):
            special[name] = value
    return ChatTemplate(source, special)


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused these messages: {message}")


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
