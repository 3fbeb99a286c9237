"""`serve bench-zmq`'s results, presented: the machine they were measured on, the Markdown table, the JSON
file and the PNG chart. The measuring is in serve.bench.transports."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve.bench.transports import Counts, Row

# The seed document's figures (latency, direction unstated), drawn on the chart beside ours.
SEED_LATENCY_US = {"inproc": (1, 5), "ipc": (10, 30), "tcp": (30, 100)}


def machine() -> dict[str, Any]:
    import platform

    import zmq

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "nproc": nproc, "platform": platform.platform(), "python": platform.python_version(),
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version()}


def write_json(path: str, rows: list[Row], plan: dict[int, Counts]) -> None:
    """The machine, the counts per message size and the rows, for a later comparison."""
    report = {"machine": machine(), "counts": {s: asdict(n) for s, n in plan.items()}, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def table(rows: list[Row]) -> str:
    head = ["transport", "pattern", "size (B)", "RTT p50 (µs)", "RTT p99 (µs)", "RTT/2 p50 (µs)", "one-way msgs/s", "MB/s", "lost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " *" if r.pattern == "req-rep" else ""
        cells = [r.transport, r.pattern, str(r.size), f"{r.rtt_p50_us:.1f}", f"{r.rtt_p99_us:.1f}", f"{r.rtt_p50_us / 2:.1f}",
                 f"{r.msgs_per_s:,.0f}{mark}", f"{r.mb_per_s:,.1f}", str(r.lost)]
        lines.append("| " + " | ".join(cells) + " |")
    m = machine()
    lines += [
        "",
        "Python on both ends (pyzmq). inproc: peer is a thread of the same process (the GIL is in the loop);",
        "ipc, tcp, mp-queue: peer is another process. RTT/2 is the one-way latency the round trip implies.",
        "* req-rep is lockstep: its msgs/s are round trips per second. MB = 10^6 bytes.",
        f"{m['cpu']}, nproc {m['nproc']}, Python {m['python']}, pyzmq {m['pyzmq']}, libzmq {m['libzmq']}",
    ]
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r.transport, r.pattern) for r in rows))
    sizes = sorted({r.size for r in rows})
    height = 0.8 / len(sizes)
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.45 * len(groups)), sharey=True)
    for i, size in enumerate(sizes):
        by_group = {(r.transport, r.pattern): r for r in rows if r.size == size}
        ys = [g + i * height for g, key in enumerate(groups) if key in by_group]
        picked = [by_group[key] for key in groups if key in by_group]
        lat.barh(ys, [r.rtt_p50_us for r in picked], height, label=f"{size} B")
        thr.barh(ys, [r.msgs_per_s for r in picked], height, label=f"{size} B")
    label = "seed's latency claim (direction unstated)"
    for transport, (lo, hi) in SEED_LATENCY_US.items():
        ys = [g for g, key in enumerate(groups) if key[0] == transport]
        if ys:
            lat.fill_betweenx([min(ys) - 0.1, max(ys) + 0.9], lo, hi, color="grey", alpha=0.3, lw=0, zorder=0, label=label)
            label = None
    millions = thr.axvline(1e6, color="grey", ls="--")
    lat.set_yticks([g + 0.4 - height / 2 for g in range(len(groups))], [f"{t} {p}" for t, p in groups])
    lat.invert_yaxis()
    lat.set_xscale("log")
    thr.set_xscale("log")
    lat.set_xlabel("round trip p50 (µs, log)")
    thr.set_xlabel("one-way messages/s (log; req-rep: lockstep round trips/s)")
    handles, labels = lat.get_legend_handles_labels()
    fig.legend(handles + [millions], labels + ["seed: millions of messages/s"],
               loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("serve bench-zmq: " + "{cpu}, nproc {nproc}, pyzmq {pyzmq}, libzmq {libzmq}".format(**machine()), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
