"""The prompts of `serve bench`: random words cut to an exact token length through the server's /tokenize
where it has one, so neither a local tokenizer nor a prefix cache bends the numbers; or lines of a file."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Awaitable, Callable

# Common English words: about one token each (with their leading space) for the usual BPE vocabularies.
WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there one all we their can has more will if would what so when who about no out up
them some could into than then its time only other new these two may do first any my now such like our over
man me even most made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old year off
come since against go came right used take three small large place water house city light sea river hand
night open music story garden field paper money point friend road tree king stone wind fire""".split()


class BenchError(Exception):
    """A problem the user can fix (unreachable server, unreadable prompt file): one line, no traceback.
    Defined here, the module load.py builds on, so that prompts.py needs nothing from load.py."""


@dataclasses.dataclass
class Prompts:
    texts: list[str]
    counts: list[int] | None  # tokens, as /tokenize counted them
    source: str


def file_prompts(path: Path, n: int | None, warmup: int) -> Prompts:
    """A text file, one prompt a line, or JSONL with a "prompt" field; taken in order, cycled to fill n + warmup."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from None
    if not lines:
        raise BenchError(f"{path} holds no prompts")
    if lines[0].lstrip().startswith("{"):
        try:
            lines = [str(json.loads(line)["prompt"]) for line in lines]
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"{path}: every line of a JSONL prompt file needs a \"prompt\" field") from None
    total = (n or len(lines)) + warmup
    return Prompts([lines[i % len(lines)] for i in range(total)], None, f"file {path}")


async def synthetic_prompts(client, model: str, args: argparse.Namespace, n: int) -> Prompts:
    """Random words (a seeded generator, different in every prompt, so a prefix cache finds nothing to share),
    cut to --input-len tokens as the server's /tokenize counts them; without /tokenize, --input-len words."""
    rng = random.Random(args.seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    count = TokenCounter(client, model, args.endpoint == "chat")
    probe = words(100)
    probed, reason = await count.probe(probe)
    if not probed:
        print(f"serve bench: {reason}: prompts are {args.input_len} random words (about a token each); "
              "the table gives the prompt tokens the server counted", file=sys.stderr)
        return Prompts([words(args.input_len) for _ in range(n)], None, "random words")
    chars_per_token = max(0.5, len(probe) / probed)
    texts = []
    for _ in range(n):  # long enough to pass the target; the cut that gives input_len tokens is searched
        text = words(32)
        while len(text) < 2 * args.input_len * chars_per_token + 64:
            text += " " + words(32)
        texts.append(text)
    print(f"serve bench: cutting {n} prompts to {args.input_len} tokens through {count.how}", file=sys.stderr)
    gate = asyncio.Semaphore(8)

    async def fit(text: str) -> tuple[str, int]:
        async with gate:
            return await fit_length(text, args.input_len, count, chars_per_token)

    fitted = await asyncio.gather(*(fit(t) for t in texts))
    return Prompts([t for t, _ in fitted], [c for _, c in fitted], f"random words, cut through {count.how}")


class TokenCounter:
    """Counts tokens through POST /tokenize. Chat counts the templated prompt (ours and vLLM take messages);
    SGLang's takes a prompt, llama.cpp's a "content"."""

    FORMS = {
        "messages": lambda text: {"messages": [{"role": "user", "content": text}]},
        "prompt": lambda text: {"prompt": text},
        "content": lambda text: {"content": text},
    }

    def __init__(self, client, model: str, chat: bool) -> None:
        self.client, self.model = client, model
        self.forms = (["messages"] if chat else []) + ["prompt", "content"]

    async def probe(self, text: str) -> tuple[int, str]:
        """The count of the first form /tokenize takes, which is kept; else 0 and why."""
        answers = []
        for form in self.forms:
            n, answer = await self._count(form, text)
            if n:
                self.forms = [form]
                return n, ""
            answers.append(answer)
        return 0, f"no usable /tokenize ({', '.join(dict.fromkeys(answers))})"

    @property
    def how(self) -> str:
        return f"/tokenize ({self.forms[0]})"

    async def _count(self, form: str, text: str) -> tuple[int, str]:
        async with self.client.post("/tokenize", json={"model": self.model, **self.FORMS[form](text)}) as r:
            status, body = r.status, await r.read()
        try:
            tokens = json.loads(body).get("tokens") if status == 200 else None
        except (ValueError, AttributeError):
            tokens = None
        if not isinstance(tokens, list) or not tokens:
            return 0, f"HTTP {status}" if status != 200 else "no tokens"
        return len(tokens), ""

    async def __call__(self, text: str) -> int:
        n, answer = await self._count(self.forms[0], text)
        if not n and text:
            raise BenchError(f"/tokenize stopped answering while cutting prompts ({answer})")
        return n


async def fit_length(text: str, target: int, count: Callable[[str], Awaitable[int]], chars_per_token: float) -> tuple[str, int]:
    """The prefix of `text` whose token count is `target` (or the nearest found): a secant search on the
    cut, falling back to bisection, over characters since a word may be several tokens."""
    lo, hi = 0, len(text)  # counts at lo stay below target, at hi above
    cut = max(1, min(hi, round(target * chars_per_token)))
    best: tuple[int, int] | None = None
    for _ in range(16):
        c = await count(text[:cut])
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (cut, c)
        if c == target:
            break
        if c < target:
            lo = cut
        else:
            hi = cut
        nxt = cut + round((target - c) * chars_per_token)
        if not lo < nxt < hi:
            nxt = (lo + hi) // 2
        if nxt in (lo, hi):
            break
        cut = nxt
    assert best is not None
    return text[:best[0]], best[1]
