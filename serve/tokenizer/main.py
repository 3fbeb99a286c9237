"""The tokenizer process: turns api requests into token ids, checks them against the context, and
forwards them to the scheduler. A request that cannot be served goes back to its api as a RequestError."""

from __future__ import annotations

import functools
import logging
import time

import zmq

from serve import constraints
from serve.config import Config
from serve.constraints import Constraint
from serve.ipc import Endpoints, send, socket
from serve.messages import (
    AbortRequest, GenerateRequest, Probe, RequestError, TokenizedRequest, TokenizeReply, TokenizeRequest, decode, encode,
)
from serve.metrics import Hop
from serve.model_files import ModelInfo
from serve.proc import Reporter
from serve.text import ChatTemplateError, TextTokenizer

log = logging.getLogger("serve.tokenizer")


class Invalid(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class Tokenize:
    def __init__(self, tokenizer: TextTokenizer, max_model_len: int, pool_tokens: int, vocab=None) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab  # llguidance's, for checking structured-output constraints
        self._checked = functools.lru_cache(maxsize=256)(self._check)  # by spec: a repeated schema is checked once
        self.max_model_len = max_model_len
        # A sequence must fit the context and the KV pool; the scheduler stops it at whichever is smaller.
        self.limit = min(max_model_len, pool_tokens)
        if pool_tokens < max_model_len:
            self.what = f"this server's KV pool holds {pool_tokens} tokens (less than the model's context of {max_model_len})"
        else:
            self.what = f"this model's maximum context length is {max_model_len} tokens"

    def answer(self, req: TokenizeRequest) -> TokenizeReply:
        """/tokenize and /detokenize."""
        if req.token_ids is not None:
            self._check_ids(req.token_ids, "tokens")
            return TokenizeReply(req.rid, req.token_ids, self.tokenizer.decode(req.token_ids))
        if req.messages is not None:
            ids = self._chat(req.messages, req.tools)
        else:
            ids = self.tokenizer.encode(req.text or "", add_special_tokens=req.add_special_tokens)
        return TokenizeReply(req.rid, ids, "")

    def _chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        try:
            return self.tokenizer.apply_chat_template(messages, tools)
        except ChatTemplateError as e:
            raise Invalid(str(e), "messages") from None

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise Invalid(f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.vocab_size - 1})", param)

    def grammar(self, req: GenerateRequest) -> str | None:
        """The request's constraint as a grammar checked against the vocabulary (None when it has none)."""
        if req.constraint is None:
            return None
        grammar, error, param = self._checked(tuple(req.constraint))
        if error is not None:
            raise Invalid(error, param)
        return grammar

    def _check(self, wire: tuple) -> tuple[str | None, str | None, str | None]:
        try:
            return constraints.check(Constraint.from_wire(list(wire)), self.vocab), None, None
        except constraints.ConstraintError as e:
            return None, str(e), e.param

    def __call__(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            ids = self._chat(req.messages, req.tools)
        elif req.prompt_ids is not None:
            self._check_ids(req.prompt_ids, "prompt")
            ids = list(req.prompt_ids)
        else:
            ids = self.tokenizer.encode(req.prompt or "")
        if not ids:
            raise Invalid("the prompt is empty", "prompt")
        n = len(ids)
        for t in list(req.sampling.stop_token_ids) + list(req.sampling.logit_bias or {}):
            if not 0 <= t < self.tokenizer.vocab_size:
                param = "stop_token_ids" if t in req.sampling.stop_token_ids else "logit_bias"
                raise Invalid(f"token id {t} is outside the vocabulary (0..{self.tokenizer.vocab_size - 1})", param)
        if n > self.limit or (n == self.limit and req.max_tokens != 0):
            raise Invalid(
                f"{self.what}, and your prompt has {n} tokens, "
                "leaving no room for a completion; shorten the prompt",
                "messages" if req.messages is not None else "prompt", "context_length_exceeded",
            )
        if req.max_tokens is None:  # no budget given: what the context has left
            req.sampling.max_new_tokens = self.limit - n
        elif n + req.max_tokens > self.limit:
            raise Invalid(
                f"{self.what}; you requested {n + req.max_tokens} tokens "
                f"({n} in the prompt, {req.max_tokens} for the completion); lower max_tokens or shorten the prompt",
                "max_tokens", "context_length_exceeded",
            )
        else:
            req.sampling.max_new_tokens = req.max_tokens
        return ids


def main(reporter: Reporter, config: Config, model: ModelInfo, eps: Endpoints) -> None:
    tokenize = Tokenize(TextTokenizer(model.hf_dir, config.model.chat_template or None), model.max_model_len, config.engine.kv_pool_tokens,
                        constraints.vocabulary(model.hf_dir, model.eos_token_ids))
    ctx = zmq.Context.instance()
    front = socket(ctx, zmq.ROUTER, eps.tokenizer, bind=True)
    to_scheduler = socket(ctx, zmq.PUSH, eps.scheduler, bind=False)
    hop = Hop("api->tokenizer", model.served_name)
    reporter.ready()
    while True:
        idle_since = time.monotonic_ns()
        api_id, payload = front.recv_multipart()
        msg = decode(payload)
        if isinstance(msg, AbortRequest):
            send(to_scheduler, msg)
            continue
        if isinstance(msg, Probe):
            send(to_scheduler, Probe(msg.rid, api_id))
            continue
        try:
            if isinstance(msg, TokenizeRequest):
                front.send_multipart([api_id, encode(tokenize.answer(msg))])
            elif isinstance(msg, GenerateRequest):
                hop.observe(msg.sent_ns, idle_since)
                ids = tokenize(msg)
                grammar = tokenize.grammar(msg)
                send(to_scheduler, TokenizedRequest(msg.rid, api_id, ids, msg.sampling, msg.group, time.monotonic_ns(), grammar))
        except Invalid as e:
            front.send_multipart([api_id, encode(RequestError(msg.rid, 400, str(e), e.param, e.code))])
