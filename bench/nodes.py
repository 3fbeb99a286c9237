"""Served figures of tensor parallelism over two nodes against one, on this machine (`make bench-nodes`).

The default config at `--tp 2` three ways, one after the other in one run: both ranks on one node (the
plans over ipc), the same two ranks as two nodes on 127.0.0.1 (node 1 a second `serve launch` with
`--node-rank 1`: the plans over tcp with CURVE, the collectives over gloo's tcp as before), and `--tp 1` for
scale. Each is measured with `serve bench` at 1 and 8 streams (random 64-token prompts, 128 output tokens,
ignore_eos): ITL p50 and p99, output tokens/s. On one machine the two "nodes" share its cores and its
loopback, so this shows what the tcp hop and its encryption cost, not what a network adds.
Prints a markdown table and saves JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from client import CONFIG, ROOT, save

from tests.server import Server, free_port


def bench(url: str, streams: int, prompts: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "serve.cli", "bench", "--base-url", url, "--concurrency", str(streams),
                        "--num-prompts", str(prompts), "--input-len", "64", "--output-len", "128", "--ignore-eos",
                        "--warmup", "2", "--no-progress", "--json", out.name], check=True, capture_output=True)
        s = json.loads(Path(out.name).read_text())["summary"]
    return {"streams": streams, "itl_p50_ms": s["itl_ms"]["p50"], "itl_p99_ms": s["itl_ms"]["p99"],
            "output_tok_s": s["output_throughput"], "failed": s.get("failed", 0)}


def measure(name: str, url: str, quick: bool) -> list[dict]:
    rows = []
    for streams in (1, 8):
        row = {"setup": name, **bench(url, streams, (2 if quick else 8) * max(1, streams // 2))}
        print(f"{name:<34} {streams:>2} streams: ITL p50 {row['itl_p50_ms']} ms, {row['output_tok_s']} tok/s", flush=True)
        rows.append(row)
    return rows


def two_nodes(quick: bool) -> list[dict]:
    base, key = free_port(), Path(tempfile.mkdtemp(prefix="serve-bench-nodes-")) / "cluster.key"
    # One rank per node and one thread per rank, as the ranks of one node get on this machine's cores (each
    # node would otherwise take all of them, as it should on a machine of its own).
    common = ["--config", CONFIG, "--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{base}", "--cluster-key", str(key),
              "--set", "engine.threads_per_rank=" + str(max(1, (os.cpu_count() or 2) // 2))]
    node0 = Server(*common, "--node-rank", "0")
    starting = threading.Thread(target=node0.__enter__)
    starting.start()
    while not key.exists():
        time.sleep(0.05)
    node1 = subprocess.Popen([sys.executable, "-m", "serve.cli", "launch", *common, "--node-rank", "1", "--port", str(free_port())],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    starting.join()
    try:
        return measure("tp 2 over two nodes (tcp + CURVE)", node0.url, quick)
    finally:
        node0.stop()
        node1.wait(20)
        shutil.rmtree(key.parent, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer requests: a smoke test")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "nodes.json"))
    args = p.parse_args()
    rows = []
    with Server("--config", CONFIG, "--tp", "2") as server:
        rows += measure("tp 2 on one node (ipc)", server.url, args.quick)
    rows += two_nodes(args.quick)
    with Server("--config", CONFIG) as server:
        rows += measure("tp 1", server.url, args.quick)
    print("\n| setup | streams | ITL p50 | ITL p99 | output tok/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['streams']} | {r['itl_p50_ms']} ms | {r['itl_p99_ms']} ms | {r['output_tok_s']} |")
    save({"date": time.strftime("%Y-%m-%d"), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
