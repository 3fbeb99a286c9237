"""The model's tokenizer and chat template, without transformers (which imports torch, seconds per process).

`tokenizer.json` is read by the `tokenizers` library, the same Rust code transformers' fast tokenizers
use; the chat template is rendered the way transformers renders it: a sandboxed jinja2 environment
with trim_blocks, lstrip_blocks, loop controls, `raise_exception` and `tojson`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json stores AddedToken dicts
        return value.get("content")
    return value


# Requests with tools, to a model whose template shows none: ChatML turns in the Hermes tool format.
HERMES = Path(__file__).parent / "tokenizer" / "hermes.jinja"


class TextTokenizer:
    """`chat_template`: a Jinja file to use instead of the model's own template (the config's model.chat_template)."""

    def __init__(self, folder: str | Path, chat_template: str | Path | None = None) -> None:
        folder = Path(folder)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if chat_template:
            template = Path(chat_template).read_text()
        self.chat_template = template
        # A template that never mentions tools would drop them silently: those requests get ours.
        self.tool_template = template if template and "tools" in template else HERMES.read_text()
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._compiled: dict[str, Any] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def decode_piece(self, token: int) -> str:
        """One token's own text, special tokens included (how logprobs name tokens)."""
        return self.tok.decode([token], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        with_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        source = self.tool_template if with_tools else self.chat_template
        if not source:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        if source not in self._compiled:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled[source] = env.from_string(source)
        try:
            text = self._compiled[source].render(
                messages=messages, tools=tools or None, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from None
        # The template writes the special tokens itself, as transformers does for chat.
        return self.encode(text, add_special_tokens=False)


def _raise(message: str) -> None:
    raise TemplateError(message)
