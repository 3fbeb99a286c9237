"""Prometheus metrics, shared by every process through prometheus-client's multiprocess mode.

The launcher points $PROMETHEUS_MULTIPROC_DIR at a folder in the ipc directory before it starts the
children; each process then writes its samples to its own memory-mapped files there, and the api's
/metrics adds them up. Names follow vLLM's and SGLang's, under `serve:`; every time is in seconds.

Who records what:
- api: time to first token, inter-token latency, end-to-end latency, finished requests, token counts;
- scheduler: queue time, and the gauges (running, waiting, KV cache use, prefix cache hit rate);
- every receiver of a ZeroMQ hop: its transit time, from the `sent_ns` stamp the sender put in the message.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The six hops a request's messages take, in order (label values of serve:zmq_hop_seconds).
HOPS = ("api->tokenizer", "tokenizer->scheduler", "scheduler->workers", "rank0->scheduler",
        "scheduler->detokenizer", "detokenizer->api")
# The plans' hop to the ranks of other nodes, observed there (serve/worker/main.py) and shown by node 0's
# /pipeline from their heartbeats (serve/nodes.py).
TCP_HOP = "scheduler->workers (tcp)"

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
        0.75, 1.0, 2.5, 5.0)
_HOP = (5e-6, 1e-5, 2e-5, 3e-5, 5e-5, 7.5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
        0.5, 1.0)

M = "model_name"
TTFT = Histogram("serve:time_to_first_token_seconds", "Time from the api receiving a request to its first token.",
                 [M], buckets=_LATENCY)
ITL = Histogram("serve:inter_token_latency_seconds", "Time between two tokens of one request, as the api sees them.",
                [M], buckets=_ITL)
E2E = Histogram("serve:e2e_request_latency_seconds", "Time from the api receiving a request to its last token.",
                [M], buckets=_LATENCY)
QUEUE = Histogram("serve:request_queue_time_seconds", "Time a request waited in the scheduler before it was admitted.",
                  [M], buckets=_LATENCY)
HOP = Histogram("serve:zmq_hop_seconds",
                "Transit of one ZeroMQ hop: from the sender's send to the receiver's recv, not counting time the "
                "receiver spent busy before it went to wait for messages.", ["hop", M], buckets=_HOP)
RUNNING = Gauge("serve:num_requests_running", "Requests being prefilled or decoded.", [M], multiprocess_mode="mostrecent")
WAITING = Gauge("serve:num_requests_waiting", "Requests waiting for admission.", [M], multiprocess_mode="mostrecent")
KV_USAGE = Gauge("serve:kv_cache_usage_perc", "Fraction (0-1) of the KV pool held by requests; unreferenced prefix "
                 "cache entries count as free, as in vLLM.", [M], multiprocess_mode="mostrecent")
PREFIX_HIT = Gauge("serve:prefix_cache_hit_rate", "Fraction (0-1) of looked-up prompt tokens found in the prefix cache.",
                   [M], multiprocess_mode="mostrecent")
PROMPT_TOKENS = Counter("serve:prompt_tokens", "Prompt tokens of requests that started.", [M])
GENERATION_TOKENS = Counter("serve:generation_tokens", "Tokens generated.", [M])
SUCCESS = Counter("serve:request_success", "Requests that finished, by reason (stop, length, abort).", [M, "finished_reason"])


def enable(folder: str) -> None:
    """Called by the launcher before it starts any child: they inherit the variable and write there."""
    os.makedirs(folder, exist_ok=True)
    os.environ[MULTIPROC_ENV] = folder


def exposition() -> tuple[bytes, str]:
    """The /metrics body: every process's samples, added up (or this process's alone outside a server)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def collect() -> list:
    """The merged metric families, for the pipeline view."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
        return list(registry.collect())
    from prometheus_client import REGISTRY

    return list(REGISTRY.collect())


class Hop:
    """The transit-time histogram of one hop, as seen by its receiver. A receiver that was busy when a
    message arrived did not keep it waiting on ZeroMQ's account: the clock starts at the later of the
    send and the moment the receiver began waiting (`idle_since_ns`)."""

    def __init__(self, hop: str, model_name: str) -> None:
        assert hop in HOPS or hop == TCP_HOP, hop
        self.child = HOP.labels(hop, model_name)

    def observe(self, sent_ns: int, idle_since_ns: int) -> None:
        if sent_ns:
            self.child.observe(max(0, time.monotonic_ns() - max(sent_ns, idle_since_ns)) / 1e9)
