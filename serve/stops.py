"""One request's output as text, decoded token by token, and where its stop strings cut it.

The scheduler and the detokenizer each run one `TextStream` per request over the same tokens: the
scheduler to end generation at the very token that completes a stop string (so no compute is spent
past it), the detokenizer to cut the text there and to hold back only the text that could still be
the start of a stop string, so no part of one ever reaches a streaming client.

Decoding keeps two offsets: text is released only once it no longer ends in a partial UTF-8 character
(U+FFFD), and is always decoded from a short window of recent tokens, so the cost per token stays
constant however long the output grows.
"""

from __future__ import annotations

from typing import Callable

# Prompt tokens decoded before the output, so that its first token decodes as it does in context
# (SentencePiece tokenizers drop a word's leading space at the start of a text).
CONTEXT_TOKENS = 4


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] = (), include_stop: bool = False,
                 context: list[int] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.ids: list[int] = list(context)  # the prompt's last tokens, then the output
        self.prefix = 0  # start of the token window decoded for context
        self.read = len(self.ids)  # tokens up to here are in `text`
        self.text = ""  # decoded so far
        self.sent = 0  # characters of `text` released
        self.stopped = False  # a stop string was found; `text` ends where the output ends

    def push(self, ids: list[int], finished: bool = False, may_stop: bool = True) -> str:
        """Adds tokens; returns the text now safe to release. `may_stop` is False while min_tokens
        forbids stopping. After a stop, everything else is ignored."""
        if self.stopped:
            return ""
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (finished or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        end = len(self.text)
        if self.stop and may_stop:
            hit = self._find_stop()
            if hit is not None:
                start, stop = hit
                self.stopped = True
                end = start + len(stop) if self.include_stop else start
                self.text = self.text[:end]
        if self.stop and not self.stopped and not finished:
            end -= self._held()
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _find_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the text not yet released. None can start earlier: `_held` kept back
        any released text's end that could begin one (text released while min_tokens forbade stopping
        may hold whole stop strings; they do not count)."""
        best = None
        for s in self.stop:
            i = self.text.find(s, self.sent)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _held(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        return max((held_back(self.text, s, len(self.text) - self.sent) for s in self.stop), default=0)


def held_back(text: str, tag: str, most: int | None = None) -> int:
    """The length of the longest end of `text` (at most `most` characters) that begins `tag`: what may
    still become the tag, and so must not be sent yet (stop strings here, tool-call tags in the api)."""
    for n in range(min(len(tag) - 1, len(text) if most is None else most), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
