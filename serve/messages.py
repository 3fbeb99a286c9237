"""Every message that crosses a ZeroMQ socket, and the one MessagePack codec for all of them.

A message travels as `[tag, field0, field1, ...]`; nested dataclasses travel as plain lists the same
way. No pickle: decoding only ever builds the dataclasses registered here.
Batch messages are columnar (lists per field), not one message per token per request.
Fields ending in `_ns` carry `time.monotonic_ns()` at send time, one clock for every process.
The launchers' own link across nodes has its three messages beside its code, in serve/nodes.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import msgpack

_REGISTRY: dict[int, type] = {}
_TAGS: dict[type, int] = {}


def message(tag: int):
    def register(cls: type) -> type:
        cls = dataclass(cls)
        assert tag not in _REGISTRY, f"duplicate message tag {tag}"
        _REGISTRY[tag] = cls
        _TAGS[cls] = tag
        return cls

    return register


@dataclass
class SamplingParams:
    """What a request asks of generation. The scheduler applies the stop and length rules, the workers'
    sampler the rest; the detokenizer uses `stop` and `include_stop_str_in_output` to cut the text."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: on tokens generated so far
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/vLLM's: on prompt and generated tokens, divides positive logits
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k: each sampled token's logprob and its top k alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (completions' echo)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class Logprobs:
    """Log-probabilities of some tokens under the model's raw distribution (before temperature,
    penalties or truncation, as vLLM reports them), with each position's top alternatives."""

    token_ids: list[int]  # the chosen token at each position (for a prompt: the actual next token)
    token_logprobs: list[float | None]  # its logprob (None only for a prompt's first token, which has no context)
    top_ids: list[list[int]]  # per position: the k most likely ids, most likely first (empty lists when k = 0)
    top_logprobs: list[list[float]]


# --- api -> tokenizer -> scheduler -------------------------------------------------------------


@message(1)
class GenerateRequest:
    rid: str
    prompt: str | None  # plain completion text, or
    messages: list[dict] | None  # chat turns, rendered with the model's chat template, or
    prompt_ids: list[int] | None  # already-tokenized input
    max_tokens: int | None  # None: whatever the context has left
    sampling: SamplingParams
    group: str | None = None  # the n samples of one prompt share a group: one prefill serves them all
    sent_ns: int = 0
    constraint: list | None = None  # structured output: serve.constraints.Constraint.to_wire()
    tools: list | None = None  # chat: the functions the template shows the model (OpenAI's `tools`)


@message(2)
class TokenizedRequest:
    rid: str
    api_id: bytes  # ZeroMQ identity of the api process that holds the HTTP connection
    input_ids: list[int]
    sampling: SamplingParams
    group: str | None = None
    sent_ns: int = 0
    grammar: str | None = None  # llguidance's grammar the output must match, checked by the tokenizer


@message(3)
class AbortRequest:
    rid: str


@message(5)
class TokenizeRequest:
    """/tokenize and /detokenize, answered by the tokenizer process (the api loads no tokenizer)."""

    rid: str
    text: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    token_ids: list[int] | None = None  # set: detokenize these instead
    tools: list | None = None  # with messages: the functions the chat template shows


@message(6)
class TokenizeReply:
    rid: str
    token_ids: list[int]
    text: str


@message(7)
class Probe:
    """/health: goes api -> tokenizer -> scheduler -> detokenizer -> api like a request, so it comes back
    only if every stage's loop is turning (and the scheduler adds: no step is stuck on the workers)."""

    rid: str
    api_id: bytes = b""


@message(4)
class RequestError:
    """Sent back to the api when a request cannot be served (validation); becomes a 4xx."""

    rid: str
    status: int
    message: str
    param: str | None = None
    code: str | None = None


# --- scheduler <-> workers ---------------------------------------------------------------------


@message(10)
class StepPlan:
    """One engine step, published to every TP rank.

    Request i owns KV row `rows[i]`; its new tokens are `input_ids[offsets[i]:offsets[i+1]]`, at
    positions starting at `starts[i]`, written to KV slots `slots[offsets[i]:offsets[i+1]]`.
    Rows in `new_rows` start a request and bring its sampling parameters, and the KV slots of its
    prefix found in the prefix cache (`new_prefix`, positions 0.. before its first new token), and how
    many tokens it had produced before (a preempted request comes back with some). An input id of -1 stands for
    the token the workers sampled last for that row (planned before that step's result came back).
    Every request samples one token, except those listed in `skip` (a prompt chunk short of its end).
    Requests with one new token come first (the engine runs them as decodes).
    Requests listed in `score` also want their prompt's logprobs: position j of their new tokens is
    scored against `score_targets[i][j]`, the prompt's next token, for as many positions as it has targets.
    """

    step: int
    rows: list[int]
    starts: list[int]
    offsets: list[int]
    input_ids: list[int]
    slots: list[int]
    new_rows: list[int] = field(default_factory=list)
    new_sampling: list[SamplingParams] = field(default_factory=list)
    new_prefix: list[list[int]] = field(default_factory=list)
    new_produced: list[int] = field(default_factory=list)  # tokens it produced before (re)admission
    new_history: list[list[int]] = field(default_factory=list)  # all its tokens, for penalties (else [])
    skip: list[int] = field(default_factory=list)
    score: list[int] = field(default_factory=list)
    score_targets: list[list[int]] = field(default_factory=list)
    score_k: list[int] = field(default_factory=list)  # top alternatives per scored position
    # Structured output: for the sampling requests listed in `mask_of` (their index among the sampling ones),
    # the tokens they may sample next, one bit per token (llguidance's bitmask, little-endian uint32 words).
    mask_of: list[int] = field(default_factory=list)
    masks: list[bytes] = field(default_factory=list)
    sent_ns: int = 0


@message(11)
class StepResult:
    step: int
    token_ids: list[int]  # one sampled token per request of the plan not in `skip`, in plan order
    logprobs: list[Logprobs | None] = field(default_factory=list)  # per token, if any request asked; else empty
    prompt_logprobs: list[Logprobs] = field(default_factory=list)  # per entry of the plan's `score`
    sent_ns: int = 0


@message(12)
class Hello:
    """Published until every rank answers, so no rank misses the first plan (PUB's slow joiner)."""

    nonce: int
    # time.time_ns() - time.monotonic_ns() on the scheduler's machine: a rank on another machine turns the
    # plans' monotonic `sent_ns` into its own clock with it (through the wall clocks, NTP-synced).
    clock_ns: int = 0


@message(13)
class HelloAck:
    rank: int
    nonce: int


@message(14)
class Shutdown:
    reason: str = ""


# --- scheduler -> detokenizer -> api -----------------------------------------------------------


@message(20)
class TokenBatch:
    rids: list[str]
    api_ids: list[bytes]
    token_ids: list[int]  # one new token per request
    finish_reasons: list[str | None]  # None while running, else "stop" or "length"
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int] = field(default_factory=list)  # prompt tokens served from the prefix cache
    stop: list[list[str]] = field(default_factory=list)  # the request's stop strings, for cutting its text
    include_stop: list[bool] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)  # no stop string counts before this many tokens
    prompt_tail: list[list[int]] = field(default_factory=list)  # last prompt tokens, context for decoding the first
    logprobs: list[Logprobs | None] = field(default_factory=list)  # empty when no request in the batch asked
    prompt_logprobs: list[Logprobs | None] = field(default_factory=list)
    sent_ns: int = 0


@message(21)
class RequestOutput:
    rid: str
    text: str  # new text since the last output
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: TextLogprobs | None = None  # of token_ids
    prompt_logprobs: TextLogprobs | None = None  # with the first output only


@dataclass
class TextLogprobs:
    """Logprobs as the api shows them: tokens as text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_tokens: list[list[str]]
    top_logprobs: list[list[float]]
    token_ids: list[int] = field(default_factory=list)  # the same tokens as ids (return_tokens_as_token_ids)
    top_ids: list[list[int]] = field(default_factory=list)


@message(22)
class OutputBatch:
    outputs: list[RequestOutput]
    sent_ns: int = 0


# --- control channel (REQ/REP) and launcher ----------------------------------------------------


@message(30)
class ControlRequest:
    kind: str  # "ping" | "stats"


@message(31)
class ControlReply:
    kind: str
    data: dict[str, Any]


@message(42)
class StageRestarted:
    """Published by the launcher when it has restarted a stateless stage (tokenizer, detokenizer): the
    requests in flight may have lost a message inside it, so the api fails them and the scheduler drops them."""

    name: str


@message(40)
class Ready:
    name: str
    pid: int
    info: dict[str, Any] = field(default_factory=dict)


@message(41)
class StartupFailed:
    name: str
    error: str


@message(45)
class Crashed:
    """A child's last words: the error that ends it, sent to the launcher before it exits."""

    name: str
    error: str


@message(46)
class Told:
    """From the api after a Stopping: every client in flight has had its error; it may be killed now."""

    name: str


@message(43)
class Stopping:
    """Published by the launcher before it stops a broken server (a child or a node died): the api fails
    every request in flight with this reason and answers /health with 503 until it is stopped."""

    reason: str


@message(44)
class RemoteProcesses:
    """Published by node 0's launcher with each heartbeat of node R: its processes, for /pipeline."""

    node_rank: int
    host: str
    processes: list[dict[str, Any]]
    hops: list[dict[str, Any]] = field(default_factory=list)


# --- codec -------------------------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return [_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, list):
        return [_to_wire(v) for v in value]
    return value


_HINTS: dict[type, list[tuple[str, Any]]] = {}


def _fields(cls: type) -> list[tuple[str, Any]]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return _HINTS[cls]


def _from_wire(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return hint(*(_from_wire(h, v) for (_, h), v in zip(_fields(hint), value)))
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item) or _union_of_dataclass(item):
            return [_from_wire(item, v) for v in value]
        return value
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return _from_wire(arg, value)
    return value


def _union_of_dataclass(hint: Any) -> bool:
    return (typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType") and any(
        dataclasses.is_dataclass(a) for a in typing.get_args(hint))


def encode(msg: Any) -> bytes:
    return msgpack.packb([_TAGS[type(msg)], *_to_wire(msg)], use_bin_type=True)


def decode(data: bytes) -> Any:
    tag, *values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise ValueError(f"unknown message tag {tag}")
    return cls(*(_from_wire(h, v) for (_, h), v in zip(_fields(cls), values)))
