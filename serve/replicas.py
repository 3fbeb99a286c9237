"""`serve replicas`: N independent servers behind the SGLang model gateway (smg), started in one go and
stopped together with Ctrl-C. The router listens on --port; replica i on --port + 1 + i; smg's metrics on
127.0.0.1 (a free port). Each replica is a plain `serve launch` with the same config and flags, and gets
threads = cores / N (engine.threads_per_rank) so they do not fight over the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serve.model_files import cache_root


def add_arguments(p) -> None:
    p.add_argument("--n", type=int, default=2, help="replicas (default 2)")
    p.add_argument("--port", type=int, default=8000, help="the router's port; replica i listens on port + 1 + i")
    p.add_argument("--host", default="127.0.0.1", help="the address the router and the replicas listen on")
    p.add_argument("--policy", default="cache_aware", help="smg's routing policy (cache_aware, power_of_two, round_robin, ...)")
    p.add_argument("--router", help="the smg executable (default: the one `make router` installs, or smg on PATH)")
    p.add_argument("launch_args", nargs="*", help="after --: flags for every replica's `serve launch` (e.g. --config X)")
    p.set_defaults(run=run)


def _router_path(given: str | None) -> str:
    for candidate in (given, str(cache_root() / "routers" / "smg" / "bin" / "smg"), shutil.which("smg")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("serve: error: smg not found; `make router` installs it in its own venv (or pass --router PATH)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run(args) -> int:
    smg = _router_path(args.router)
    threads = max(1, (os.cpu_count() or 1) // args.n)
    children: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    urls = [f"http://{args.host}:{args.port + 1 + i}" for i in range(args.n)]
    try:
        for i, url in enumerate(urls):
            cmd = [sys.executable, "-m", "serve.cli", "launch", "--set", f"engine.threads_per_rank={threads}", *args.launch_args,
                   "--host", args.host, "--port", str(args.port + 1 + i)]
            # A session of its own: Ctrl-C in this terminal reaches us, and we stop each replica in order.
            children.append((f"replica-{i}", subprocess.Popen(cmd, start_new_session=True)))
        while not all(_healthy(u) for u in urls):
            dead = [name for name, p in children if p.poll() is not None]
            if dead or stopping:
                if dead:
                    print(f"serve replicas: {dead[0]} exited before it was ready", file=sys.stderr)
                return 1
            time.sleep(0.5)
        cmd = [smg, "launch", "--host", args.host, "--port", str(args.port), "--worker-urls", *urls, "--policy", args.policy,
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]
        children.append(("router", subprocess.Popen(cmd, start_new_session=True)))
        print(f"serve replicas: {args.n} replicas ({', '.join(urls)}) behind smg ({args.policy}) at http://{args.host}:{args.port}; "
              "Ctrl-C stops them all", file=sys.stderr, flush=True)
        while not stopping:
            for name, p in children:
                if p.poll() is not None and name == "router":
                    print(f"serve replicas: the router exited ({p.returncode}); stopping the replicas", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        for _, p in reversed(children):  # the router first, so it stops sending work
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _, p in reversed(children):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
