"""GET /pipeline: the live view of the server behind the web page at /.

The processes (found as the launcher's children, by their `serve:` titles) with pid, state, CPU and
memory; the scheduler's queues (over the control channel); and, from the merged Prometheus samples,
token counts and the transit time of each ZeroMQ hop. Counts are cumulative: the page takes differences
between two polls for rates.
"""

from __future__ import annotations

import time

from serve import metrics
from serve.proc import Processes


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def from_metrics(names: tuple[str, ...] = metrics.HOPS) -> dict:
    """Token and request counters, and per-hop count, sum, p50 and p99, from every process's samples."""
    tokens = {"prompt": 0.0, "generation": 0.0}
    finished: dict[str, float] = {}
    hops = {h: {"count": 0.0, "sum_s": 0.0, "buckets": {}} for h in names}
    for family in metrics.collect():
        for s in family.samples:
            if s.name == "serve:prompt_tokens_total":
                tokens["prompt"] += s.value
            elif s.name == "serve:generation_tokens_total":
                tokens["generation"] += s.value
            elif s.name == "serve:request_success_total":
                reason = s.labels["finished_reason"]
                finished[reason] = finished.get(reason, 0) + s.value
            elif s.name.startswith("serve:zmq_hop_seconds") and s.labels.get("hop") in hops:
                hop = hops[s.labels["hop"]]
                if s.name.endswith("_count"):
                    hop["count"] += s.value
                elif s.name.endswith("_sum"):
                    hop["sum_s"] += s.value
                elif s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    hop["buckets"][le] = hop["buckets"].get(le, 0) + s.value
    out = []
    for name, h in hops.items():
        buckets = sorted(h.pop("buckets").items())
        out.append({"hop": name, **h, "p50_s": quantile(buckets, 0.5), "p99_s": quantile(buckets, 0.99)})
    return {"tokens": tokens, "finished": finished, "hops": out}


async def snapshot(bridge, processes: Processes, model_name: str, started: float) -> dict:
    stats = await bridge.ask("stats", timeout_s=1.0)
    local = from_metrics()
    remote = [r for _, r in sorted(bridge.remote.items())]  # the other nodes, as their launchers last said (each second)
    return {
        "model": model_name,
        "time": time.time(),
        "uptime_s": time.time() - started,
        "processes": processes.snapshot(),
        "nodes": [{"node_rank": r.node_rank, "host": r.host, "processes": r.processes} for r in remote],
        "api": {"in_flight": len(bridge.live)},
        "scheduler": stats,  # None when it did not answer within a second
        **local,
        # and the plans' tcp hop to each other node, as its ranks saw it
        "hops": local["hops"] + [{**h, "hop": f"{h['hop']} node {r.node_rank}"} for r in remote for h in r.hops],
    }
