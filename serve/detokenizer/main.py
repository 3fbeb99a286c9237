"""The detokenizer process: token ids in, text deltas out, routed to the api process that holds each request.

Each request's text comes from a `TextStream` (serve/stops.py), which also cuts it at a stop string.
Logprobs are turned into token text here too, since this is the process that has the tokenizer.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque

import zmq

from serve.config import Config
from serve.ipc import Endpoints, recv, socket
from serve.messages import Logprobs, OutputBatch, Probe, RequestOutput, TextLogprobs, TokenBatch, encode
from serve.metrics import Hop
from serve.model_files import ModelInfo
from serve.proc import Reporter
from serve.stops import TextStream
from serve.text import TextTokenizer

log = logging.getLogger("serve.detokenizer")

# A ROUTER can route to an api only once that api's DEALER has connected. A restarted detokenizer gets
# the scheduler's queued outputs at once, while the api's DEALER reconnects ~0.1 s later: outputs that
# cannot be routed are held this long (and retried in order) before they are dropped as undeliverable.
# Dropping them at once lost a /health probe's reply (a 20 s wait) or a request's tokens (a hang).
UNROUTABLE_GRACE_S = 2.0
RETRY_MS = 20


class Outbox:
    """What goes to the api processes, in order per api, through the ROUTER."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.held: dict[bytes, deque[tuple[float, bytes, int]]] = {}  # api -> (give up at, payload, outputs)

    def send(self, api_id: bytes, payload: bytes, outputs: int) -> None:
        if api_id in self.held:  # behind what is already waiting for that api
            self.held[api_id].append((time.monotonic() + UNROUTABLE_GRACE_S, payload, outputs))
            return
        try:
            self.sock.send_multipart([api_id, payload])
        except zmq.ZMQError:  # not connected (yet): ROUTER_MANDATORY
            self.held[api_id] = deque([(time.monotonic() + UNROUTABLE_GRACE_S, payload, outputs)])

    def retry(self) -> None:
        for api_id in list(self.held):
            queue = self.held[api_id]
            while queue:
                give_up, payload, outputs = queue[0]
                try:
                    self.sock.send_multipart([api_id, payload])
                except zmq.ZMQError:
                    if time.monotonic() < give_up:
                        break
                    log.warning("api %s unreachable; dropped %d outputs", api_id, outputs)
                queue.popleft()
            if not queue:
                del self.held[api_id]


class Detokenizer:
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.streams: dict[str, TextStream] = {}
        self.pieces: dict[int, str] = {}  # token id -> its text, for logprobs

    def push(self, rid: str, token: int, finished: bool, stop: list[str], include_stop: bool, may_stop: bool,
             context: list[int]) -> tuple[str, list[int]]:
        s = self.streams.get(rid)
        if s is None:
            s = self.streams[rid] = TextStream(self.tokenizer.decode, stop, include_stop, context)
        new_ids = [token] if token >= 0 else []
        text = s.push(new_ids, finished, may_stop)
        if finished:
            del self.streams[rid]
        return text, new_ids

    def piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tokenizer.decode_piece(token)
        return self.pieces[token]

    def text_logprobs(self, lp: Logprobs | None) -> TextLogprobs | None:
        if lp is None:
            return None
        return TextLogprobs(
            [self.piece(t) for t in lp.token_ids], lp.token_logprobs,
            [[self.piece(t) for t in top] for top in lp.top_ids], lp.top_logprobs, lp.token_ids, lp.top_ids,
        )


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    detok = Detokenizer(TextTokenizer(model.hf_dir))
    ctx = zmq.Context.instance()
    inbox = socket(ctx, zmq.PULL, eps.detokenizer, bind=True)
    outbox = Outbox(socket(ctx, zmq.ROUTER, eps.outputs, bind=True))
    hop = Hop("scheduler->detokenizer", model.served_name)
    reporter.ready()
    while True:
        idle_since = time.monotonic_ns()
        if outbox.held:
            outbox.retry()
            if outbox.held and not inbox.poll(RETRY_MS):
                continue
        batch = recv(inbox)
        if isinstance(batch, Probe):
            outbox.send(batch.api_id, encode(batch), 1)
            continue
        if not isinstance(batch, TokenBatch):
            continue
        hop.observe(batch.sent_ns, idle_since)
        per_api: dict[bytes, list[RequestOutput]] = defaultdict(list)
        for i, rid in enumerate(batch.rids):
            reason = batch.finish_reasons[i]
            stop = batch.stop[i] if batch.stop else []
            include = bool(batch.include_stop and batch.include_stop[i])
            # The scheduler finishes a request on the token that completes a stop string; stopping
            # earlier here than there is impossible, as both run the same TextStream over the same tokens.
            may_stop = batch.completion_tokens[i] >= batch.min_tokens[i] if batch.min_tokens else True
            context = batch.prompt_tail[i] if batch.prompt_tail else []
            text, ids = detok.push(rid, batch.token_ids[i], reason is not None, stop, include, may_stop, context)
            per_api[batch.api_ids[i]].append(RequestOutput(
                rid, text, ids, reason, batch.prompt_tokens[i], batch.completion_tokens[i], batch.cached_tokens[i],
                detok.text_logprobs(batch.logprobs[i]) if batch.logprobs else None,
                detok.text_logprobs(batch.prompt_logprobs[i]) if batch.prompt_logprobs else None,
            ))
        for api_id, outputs in per_api.items():
            outbox.send(api_id, encode(OutputBatch(outputs, time.monotonic_ns())), len(outputs))
