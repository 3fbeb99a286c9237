"""The detokenizer process: token ids in, text deltas out, routed to the api process that holds each request.

Incremental decoding keeps two offsets per request: text is emitted only once it no longer ends in a
partial UTF-8 character (U+FFFD), and always from a short window of recent tokens, so the cost per
token stays constant however long the output grows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import zmq

from serve.config import Config
from serve.ipc import Endpoints, recv, socket
from serve.messages import OutputBatch, RequestOutput, TokenBatch, encode
from serve.model_files import ModelInfo
from serve.proc import Reporter
from serve.tokenizer.text import TextTokenizer

log = logging.getLogger("serve.detokenizer")


@dataclass
class Stream:
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # start of the window decoded for context
    read: int = 0  # tokens up to here have been emitted as text


class Detokenizer:
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.streams: dict[str, Stream] = {}

    def push(self, rid: str, token: int, finished: bool) -> tuple[str, list[int]]:
        s = self.streams.setdefault(rid, Stream())
        new_ids = [token] if token >= 0 else []
        s.ids.extend(new_ids)
        before = self.tokenizer.decode(s.ids[s.prefix:s.read])
        text = self.tokenizer.decode(s.ids[s.prefix:])
        delta = ""
        if len(text) > len(before) and (finished or not text.endswith("\ufffd")):
            delta = text[len(before):]
            s.prefix, s.read = s.read, len(s.ids)
        if finished:
            del self.streams[rid]
        return delta, new_ids


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    detok = Detokenizer(TextTokenizer(model.hf_dir))
    ctx = zmq.Context.instance()
    inbox = socket(ctx, zmq.PULL, eps.detokenizer, bind=True)
    apis = socket(ctx, zmq.ROUTER, eps.outputs, bind=True)
    reporter.ready()
    while True:
        batch = recv(inbox)
        if not isinstance(batch, TokenBatch):
            continue
        per_api: dict[bytes, list[RequestOutput]] = defaultdict(list)
        for i, rid in enumerate(batch.rids):
            reason = batch.finish_reasons[i]
            text, ids = detok.push(rid, batch.token_ids[i], reason is not None)
            per_api[batch.api_ids[i]].append(
                RequestOutput(rid, text, ids, reason, batch.prompt_tokens[i], batch.completion_tokens[i], batch.cached_tokens[i])
            )
        for api_id, outputs in per_api.items():
            try:
                apis.send_multipart([api_id, encode(OutputBatch(outputs, batch.sent_ns))])
            except zmq.ZMQError:  # that api process is gone (ROUTER_MANDATORY): nobody to tell
                log.warning("api %s unreachable; dropped %d outputs", api_id, len(outputs))
