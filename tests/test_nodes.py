"""Tensor parallelism over two nodes, tried on one machine: node 0 and node 1 are two process trees on
127.0.0.1, node 1 in a mount namespace of its own with an empty /tmp (tests/private_tmp.py), so that only
tcp reaches it. Greedy answers equal --tp 1's; the banner and /pipeline show node 1; a peer without the
key gets nothing in; a node that never comes is named; either node's death stops the other."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack
import psutil
import pytest
import zmq
import zmq.auth

from serve.messages import StepResult, encode
from serve.nodes import NodeDown
from serve.model_files import cache_root
from tests.conftest import TINY_NAME
from tests.server import Server, alive, free_port
from tests.test_faults import descendants, start_streams, wait_gone, wait_streams
from tests.test_web import browser, js, processes_shown, wait  # noqa: F401 (browser: a fixture)

REPO = Path(__file__).resolve().parent.parent
PRIVATE_TMP = ["unshare", "--mount", "--map-root-user", sys.executable, str(REPO / "tests" / "private_tmp.py")]


def _can_unshare() -> bool:
    try:
        return subprocess.run([*PRIVATE_TMP[:3], "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="unshare --mount --map-root-user is not allowed here")


def free_ports(n: int) -> int:
    """A base port with the n ports from it free (the cluster uses PORT..PORT+3)."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no run of free ports")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Node:
    """Node R > 0: `serve launch ... --node-rank R` in a private /tmp, its own session (killpg reaches it all)."""

    def __init__(self, args: list[str], seen: list[str]) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        keep = [str(REPO), str(cache_root()), *seen]
        self.proc = subprocess.Popen([*PRIVATE_TMP, *keep, "--", sys.executable, "-m", "serve.cli", "launch",
                                      "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)
        self.pids: list[int] = []

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "ready: " not in self.read_log():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.read_log()
            time.sleep(0.1)
        self.pids = [self.proc.pid, *descendants(self.proc.pid)]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for p in self.pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        self.log.close()


def cluster_args(model: Path, key: Path, base: int, rank: int, *extra: str) -> list[str]:
    return ["--model", str(model), "--served-name", TINY_NAME, "--dtype", "float32", "--tp", "2", "--nnodes", "2",
            "--node-rank", str(rank), "--dist-init-addr", f"127.0.0.1:{base}", "--cluster-key", str(key),
            "--set", "engine.threads_per_rank=1", "--set", "cluster.join_timeout_s=60", *extra]


class TwoNodes:
    def __init__(self, model: Path, workdir: Path, *extra: str) -> None:
        self.model, self.key, self.base, self.extra = model, workdir / "cluster.key", free_ports(4), extra

    def __enter__(self) -> TwoNodes:
        # Node 0 starts in the background: it is ready only once node 1 has joined. It writes the key file,
        # which node 1 needs before it starts (in life, the operator copies it over).
        self.node0 = Server(*cluster_args(self.model, self.key, self.base, 0, *self.extra))
        failed: list[Exception] = []

        def start_node0() -> None:
            try:
                self.node0.__enter__()
            except Exception as e:  # noqa: BLE001 (raised below, with node 1's log)
                failed.append(e)

        starting = threading.Thread(target=start_node0)
        starting.start()
        deadline = time.monotonic() + 30
        while not self.key.exists():
            assert time.monotonic() < deadline and starting.is_alive(), "node 0 wrote no key file"
            time.sleep(0.05)
        self.node1 = Node(cluster_args(self.model, self.key, self.base, 1, *self.extra), [str(self.model), str(self.key)])
        starting.join()
        if failed:
            log = self.node1.read_log()
            self.node1.close()
            raise RuntimeError(f"{failed[0]}\nnode 1:\n{log}")
        self.node1.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.node0.__exit__(*exc)
        self.node1.close()


@pytest.fixture(scope="module")
def two_nodes(tiny_model, tmp_path_factory):
    with TwoNodes(tiny_model, tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes


PROMPTS = ["The quick brown fox", "What is the capital of France?", "def add(a, b):"]


def greedy(server: Server) -> list[str]:
    out = server.client().completions.create(model=TINY_NAME, prompt=PROMPTS, max_tokens=16, temperature=0)
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_two_nodes_answer_as_one(two_nodes, tiny_server):
    assert greedy(two_nodes.node0) == greedy(tiny_server)  # tiny_server: the same model at --tp 1, float32
    chunks = list(two_nodes.node0.client().chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True, temperature=0))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_node1_runs_only_its_rank_and_is_seen_from_node0(two_nodes):
    node0, node1 = two_nodes.node0, two_nodes.node1
    titles0 = sorted(c for c in descendants(node0.proc.pid).values() if c.startswith("serve:"))
    titles1 = sorted(c for c in descendants(node1.proc.pid).values() if c.startswith("serve:"))
    assert titles0 == ["serve:api", "serve:detokenizer", "serve:scheduler", "serve:tokenizer", "serve:worker-0"]
    assert titles1 == ["serve:worker-1"]
    # Node 1's ipc directory lives in its private /tmp: not here, so nothing of node 0 could have used it.
    ipc1 = re.search(r"ipc: (\S+)", node1.read_log()).group(1)
    assert not os.path.exists(ipc1) and os.path.exists(node0.ipc_dir)

    banner = node0.read_log()
    assert re.search(r"node 1 \(.*\): ranks 1\n", banner), banner
    assert re.search(rf"serve:worker-1 .*\n.*SUB connect tcp://127.0.0.1:{two_nodes.base + 1} \(curve\)", banner), banner
    assert f"PUB bind tcp://127.0.0.1:{two_nodes.base + 1} (curve)" in banner

    greedy(node0)
    deadline = time.monotonic() + 5  # node 1 reports with its next heartbeat (each second)
    while True:
        pipeline = httpx.get(f"{node0.url}/pipeline").json()
        tcp = next((h for h in pipeline["hops"] if h["hop"] == "scheduler->workers (tcp) node 1"), None)
        if (tcp and tcp["count"] > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    remote = {p["name"] for n in pipeline["nodes"] if n["node_rank"] == 1 for p in n["processes"]}
    assert remote == {"launcher", "worker-1"}
    assert tcp and tcp["count"] >= 16 and 0 < tcp["p50_s"] < 0.05, pipeline["hops"]  # every plan crossed it
    health = httpx.get(f"http://127.0.0.1:{node1.port}/health")
    assert health.status_code == 200 and health.json()["node_rank"] == 1
    assert httpx.get(f"http://127.0.0.1:{node1.port}/v1/models").status_code == 404  # the API is on node 0


def test_the_web_page_shows_node1(two_nodes, browser):
    """The pipeline view lists node 1's rank and launcher with their pids, and the tcp hop to it."""
    node1 = {c: p for p, c in descendants(two_nodes.node1.proc.pid).items()}
    want = {"worker-1": node1["serve:worker-1"], "launcher@node1": two_nodes.node1.proc.pid}
    browser.get(f"{two_nodes.node0.url}/")
    wait(browser, lambda d: want.items() <= {n: pid for n, pid, _ in processes_shown(d)}.items(),
         f"the pipeline view never showed {want}")
    greedy(two_nodes.node0)
    wait(browser, lambda d: js(d, 'document.getElementById("hop-scheduler-workers-tcp-node-1") !== null'),
         "the pipeline view never showed the tcp hop to node 1")


def test_our_cluster_ports_listen_on_the_given_address_only(two_nodes):
    """PORT+1..PORT+3 are ours; PORT is torch's store, which listens on every interface (the README says so)."""
    launcher = two_nodes.node0.proc.pid
    scheduler = next(p for p, c in descendants(launcher).items() if c == "serve:scheduler")

    def listening(pid: int) -> set:
        return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    base = two_nodes.base
    assert listening(scheduler) == {("127.0.0.1", base + 1), ("127.0.0.1", base + 2)}
    assert ("127.0.0.1", base + 3) in listening(launcher)
    assert all(ip == "127.0.0.1" for ip, _ in listening(launcher))


def test_a_peer_without_the_key_gets_nothing_in(two_nodes):
    node0, base = two_nodes.node0, two_nodes.base
    ctx = zmq.Context()
    try:
        spies = []
        for keys in (None, zmq.curve_keypair()):  # no security at all; CURVE with a key of its own
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.subscribe(b"")
            if keys is not None:
                server_public = zmq.auth.load_certificate(two_nodes.key)[0]
                sub.curve_serverkey, (sub.curve_publickey, sub.curve_secretkey) = server_public, keys
            sub.connect(f"tcp://127.0.0.1:{base + 1}")
            spies.append(sub)
            # And try to inject: a step result the scheduler would apply, a "node down" the launcher would obey.
            for port, msg in ((base + 2, StepResult(1, [0, 0, 0])), (base + 3, NodeDown(1, "injected"))):
                push = ctx.socket(zmq.PUSH if port == base + 2 else zmq.DEALER)
                push.setsockopt(zmq.LINGER, 0)
                if keys is not None:
                    push.curve_serverkey, (push.curve_publickey, push.curve_secretkey) = server_public, keys
                push.connect(f"tcp://127.0.0.1:{port}")
                try:
                    push.send(encode(msg), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # never connected: nothing could be sent
                spies.append(push)
        time.sleep(1.0)
        assert greedy(node0) == greedy(node0)  # plans flowed meanwhile, and the server is unharmed
        assert all(not s.poll(200) for s in spies if s.type == zmq.SUB), "a plan reached a peer without the key"
        assert httpx.get(f"{node0.url}/health").status_code == 200
        assert "injected" not in node0.read_log()
    finally:
        ctx.destroy(linger=0)
    assert msgpack  # messages are MessagePack: nothing a peer sends is unpickled (serve/messages.py)


def test_killing_node0_stops_node1(two_nodes):
    """Last in the module: it ends the shared pair."""
    node0, node1 = two_nodes.node0, two_nodes.node1
    procs0 = [node0.proc.pid, *descendants(node0.proc.pid)]
    os.kill(node0.proc.pid, signal.SIGKILL)  # its children die with it (PR_SET_PDEATHSIG)
    killed_at = time.monotonic()
    node1.proc.wait(20)
    gone = wait_gone(node1.pids + procs0, 15)
    print(f"\nnode 0 killed: node 1 exited after {time.monotonic() - killed_at:.1f}s")
    assert time.monotonic() - killed_at < 15, node1.read_log()
    assert gone < 15 and node1.proc.returncode == 1
    assert "stopping this node" in node1.read_log()
    deadline = time.monotonic() + 5  # node 0's janitor removes its ipc directory once its children are gone
    while os.path.exists(node0.ipc_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(node0.ipc_dir)


def test_killing_node1_fails_clients_and_stops_node0(long_model, tmp_path):
    with TwoNodes(long_model, tmp_path) as nodes:
        node0, node1 = nodes.node0, nodes.node1
        procs = [node0.proc.pid, *descendants(node0.proc.pid)]
        streams = start_streams(node0.url, n=2)
        os.killpg(node1.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        codes = []
        while node0.proc.poll() is None and time.monotonic() - killed_at < 15:
            try:
                codes.append(httpx.get(f"{node0.url}/health", timeout=2).status_code)
            except httpx.HTTPError:
                codes.append(None)
            time.sleep(0.1)
        node0.proc.wait(5)
        try:  # once it has exited, nothing answers (the loop may have ended between its last 200 and the exit)
            codes.append(httpx.get(f"{node0.url}/health", timeout=2).status_code)
        except httpx.HTTPError:
            codes.append(None)
        gone = wait_gone(procs, 15 - (time.monotonic() - killed_at))
        wait_streams(streams, 5)
        print(f"\nnode 1 killed: node 0 exited after {time.monotonic() - killed_at:.1f}s, /health said {codes}")
        assert node0.proc.returncode == 1 and gone < 15
        assert all(s.outcome == "error event" for s in streams), [s.outcome for s in streams]
        # Healthy until node 0 notices (a collective fails at once, a silent node within 5 s), then never again:
        # 503 while the api tells its clients why (a few milliseconds), then no answer once it has stopped.
        down = next(i for i, c in enumerate(codes) if c != 200)
        assert all(c in (503, None) for c in codes[down:]), codes
        assert not os.path.exists(node0.ipc_dir)
        assert re.search(r"ERROR .*stopping the server", node0.read_log())


def test_a_node_that_never_comes_is_named(tiny_model, tmp_path):
    args = cluster_args(tiny_model, tmp_path / "cluster.key", free_ports(4), 0, "--set", "cluster.join_timeout_s=1")
    out = subprocess.run([sys.executable, "-m", "serve.cli", "launch", "--port", str(free_port()), *args],
                         capture_output=True, text=True, timeout=60)
    errors = [ln for ln in out.stderr.splitlines() + out.stdout.splitlines() if "ERROR" in ln]
    assert out.returncode == 1
    assert len(errors) == 1 and "node rank 1 of 2 did not join within 1s" in errors[0], out.stdout + out.stderr
    assert "--node-rank 1" in errors[0]


@pytest.mark.parametrize("flags, needle", [
    (["--nnodes", "2", "--tp", "3", "--cluster-key", "k"], "engine.tp (3) must be a multiple of cluster.nnodes (2)"),
    (["--nnodes", "2", "--tp", "2"], "more than one node needs --cluster-key FILE"),
    (["--nnodes", "2", "--tp", "2", "--node-rank", "1", "--cluster-key", "/nonexistent/k"], "copy the key file node 0 wrote"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be 0 to nnodes - 1"),
    (["--nnodes", "2", "--tp", "2", "--cluster-key", "k", "--dist-init-addr", "10.0.0.1"], "must be HOST:PORT"),
])
def test_a_wrong_cluster_flag_is_one_clear_line(tiny_model, flags, needle):
    from tests.test_launch import assert_one_line_error, launch

    assert_one_line_error(launch("--model", str(tiny_model), *flags), needle)
