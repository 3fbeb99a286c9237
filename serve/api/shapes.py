"""The JSON shapes of OpenAI's responses: chat and text completions, whole or as stream chunks, with
their logprobs and usage. One `Shape` per response; a choice is one sample of one prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from serve.api.tools import ToolParser, merge, message
from serve.messages import RequestOutput, TextLogprobs


def as_ids(lp: TextLogprobs | None, on: bool) -> TextLogprobs | None:
    """vLLM's return_tokens_as_token_ids: tokens named "token_id:N", for byte tokens that are no text alone."""
    if lp is None or not on:
        return lp
    return TextLogprobs([f"token_id:{t}" for t in lp.token_ids], lp.token_logprobs,
                        [[f"token_id:{t}" for t in top] for top in lp.top_ids], lp.top_logprobs, lp.token_ids, lp.top_ids)


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list = field(default_factory=list)  # chat: content entries; completions: per-output parts
    offset: int = 0  # completions: characters of the tokens' text so far, for text_offset


def usage(choices: list[Choice], n: int) -> dict:
    """Each prompt counts once, however many samples it has (choices p*n .. p*n+n-1 are prompt p's), and
    so do its cached tokens: those of the sample that found the most."""
    prompts = [choices[p:p + n] for p in range(0, len(choices), n)]
    prompt = sum(group[0].prompt_tokens for group in prompts)
    cached = sum(max(c.cached_tokens for c in group) for group in prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatShape:
    """`tool_calls`: "off" (the text is content), "on" (the text may hold calls: serve/api/tools.py), or
    "named" (a call to the named function; it finishes with "stop", as OpenAI's does)."""

    def __init__(self, rid: str, model: str, logprobs: bool, token_ids: bool = False, tool_calls: str = "off") -> None:
        self.base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.logprobs, self.token_ids = logprobs, token_ids
        self.tool_calls = tool_calls
        self.parsers: dict[int, ToolParser] = {}

    def head(self, index: int) -> dict:
        # OpenAI's first chunk of a choice carries the role alone.
        return {**self.base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}

    def update(self, c: Choice, out: RequestOutput, echo: str = "") -> dict | None:
        """Adds an output to its choice; returns the stream chunk for it, or None if it shows nothing."""
        c.text += out.text
        _count(c, out)
        entries = _chat_entries(as_ids(out.logprobs, self.token_ids)) if self.logprobs and out.logprobs else []
        c.logprobs.extend(entries)
        delta = {"content": out.text} if out.text else {}
        if self.tool_calls != "off":
            parser = self.parsers.setdefault(c.index, ToolParser())
            delta = parser.feed(out.text)
            if out.finish_reason is not None:
                delta = merge(delta, parser.finish())
                c.finish_reason = self._finish(parser, out.finish_reason)
        if not delta and not entries and out.finish_reason is None:
            return None
        lp = {"content": entries} if self.logprobs else None
        return {**self.base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": c.finish_reason}]}

    def _finish(self, parser: ToolParser, reason: str) -> str:
        """OpenAI's: "tool_calls" when calls were made (never for none), "stop" for a named function."""
        return "tool_calls" if reason == "stop" and parser.calls and self.tool_calls == "on" else reason

    def final(self, choices: list[Choice], n: int) -> dict:
        return {**self.base, "object": "chat.completion", "choices": [{
            "index": c.index,
            "message": message(self.parsers[c.index]) if c.index in self.parsers else {"role": "assistant", "content": c.text},
            "logprobs": {"content": c.logprobs} if self.logprobs else None, "finish_reason": c.finish_reason,
        } for c in choices], "usage": usage(choices, n)}

    def usage_chunk(self, choices: list[Choice], n: int) -> dict:
        return {**self.base, "choices": [], "usage": usage(choices, n)}


class CompletionShape:
    def __init__(self, rid: str, model: str, logprobs: int | None, token_ids: bool = False) -> None:
        self.base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
        self.logprobs, self.token_ids = logprobs, token_ids

    def head(self, index: int) -> None:
        return None

    def update(self, c: Choice, out: RequestOutput, echo: str = "") -> dict | None:
        """`echo` is the prompt's text, given with a choice's first output when the request echoes."""
        text = echo + out.text
        c.text += text
        _count(c, out)
        lp = None
        if self.logprobs is not None:
            # Prompt logprobs come with a choice's first output, and only when it echoes.
            lp = _merge(self._logprobs(c, out.prompt_logprobs), self._logprobs(c, out.logprobs))
        if not text and lp is None and out.finish_reason is None:
            return None
        return {**self.base, "choices": [{"index": c.index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}]}

    def _logprobs(self, c: Choice, lp: TextLogprobs | None) -> dict | None:
        """OpenAI's legacy shape: parallel lists. A token's text offset is where it starts in the choice's
        text (the prompt's, when echoed), counted over the tokens' own text."""
        if lp is None:
            return None
        offsets = []
        for token in lp.tokens:
            offsets.append(c.offset)
            c.offset += len(token)
        lp = as_ids(lp, self.token_ids)
        # The prompt's first token has no logprob and no alternatives: null in both lists.
        tops = [None if v is None else dict(zip(tt, tv)) for tt, tv, v in zip(lp.top_tokens, lp.top_logprobs, lp.token_logprobs)]
        part = {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "top_logprobs": tops, "text_offset": offsets}
        c.logprobs.append(part)
        return part

    def final(self, choices: list[Choice], n: int) -> dict:
        return {**self.base, "choices": [{
            "index": c.index, "text": c.text, "finish_reason": c.finish_reason,
            "logprobs": _merge_all(c.logprobs) if self.logprobs is not None else None,
        } for c in choices], "usage": usage(choices, n)}

    def usage_chunk(self, choices: list[Choice], n: int) -> dict:
        return {**self.base, "choices": [], "usage": usage(choices, n)}


def _count(c: Choice, out: RequestOutput) -> None:
    c.finish_reason = out.finish_reason
    c.prompt_tokens, c.completion_tokens, c.cached_tokens = out.prompt_tokens, out.completion_tokens, out.cached_tokens


def _chat_entries(lp: TextLogprobs) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**entry(t, v), "top_logprobs": [entry(tt, tv) for tt, tv in zip(top_t, top_v)]}
            for t, v, top_t, top_v in zip(lp.tokens, lp.token_logprobs, lp.top_tokens, lp.top_logprobs)]


def _merge(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def _merge_all(parts: list[dict]) -> dict:
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        merged = _merge(merged, p)
    return merged
