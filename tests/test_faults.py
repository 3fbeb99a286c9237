"""Faults, as an operator meets them: a process of the server is killed while clients stream, the
launcher itself is killed, a child dies during start-up, two servers share one machine.

Every test kills real processes and checks what a user would see: a log line naming the dead process
and how it died, clients that get an error instead of hanging, no process left, no ipc directory left
(a SIGKILLed launcher's is removed by its janitor process; a stale one must not bother the next server).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_NAME
from tests.server import Server, alive, free_port

STREAMS = 8


# --- processes, found through /proc ----------------------------------------------------------------

def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root` (children, grandchildren, ...) with its command line: `serve:<name>`
    once a child has set its title, the spawn command before that."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                # The command name in field 2 may hold spaces and parentheses: split after the last ")".
                parent_of[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = {}, [root]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier and p not in found]
        found.update((p, cmdline(p)) for p in kids)
        frontier = kids
    return {p: c for p, c in found.items() if alive(p)}


def pid_titled(root: int, name: str) -> int:
    pids = [p for p, c in descendants(root).items() if c == f"serve:{name}"]
    assert len(pids) == 1, f"no single serve:{name} under {root}: {descendants(root)}"
    return pids[0]


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until none of `pids` is alive (a zombie counts as gone); `timeout` if some still are."""
    started = time.monotonic()
    while any(alive(p) for p in pids) and time.monotonic() - started < timeout:
        time.sleep(0.02)
    return time.monotonic() - started


def kill_all(pids: list[int]) -> None:
    for p in pids:  # only ever our own server's processes, never a broad name
        if alive(p):
            os.kill(p, signal.SIGKILL)


def wait_for_log(server: Server, pattern: str, timeout: float) -> tuple[float, str | None]:
    """Seconds until a log line matches `pattern`, and the line."""
    started = time.monotonic()
    while True:
        line = next((ln for ln in server.read_log().splitlines() if re.search(pattern, ln)), None)
        if line is not None or time.monotonic() - started >= timeout:
            return time.monotonic() - started, line
        time.sleep(0.02)


# --- clients ----------------------------------------------------------------------------------------

class Stream(threading.Thread):
    """One streaming completion that would run for a minute (ignore_eos, thousands of tokens). Records how
    it ended: an exception, a stream closed without `[DONE]`, or a finish_reason."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.first_chunk = threading.Event()
        self.chunks = 0
        self.outcome = "running"
        self.ended_at: float | None = None

    def run(self) -> None:
        body = {"model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": 8000, "stream": True,
                "ignore_eos": True, "temperature": 0.8}
        # The read timeout is the hang detector: a stream that neither moves nor ends fails the test.
        timeout = httpx.Timeout(15.0, connect=5.0)
        finish = None
        try:
            with httpx.Client(timeout=timeout) as http, http.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    self.outcome = f"http {r.status_code}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.outcome = f"done ({finish})"
                        return
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.outcome = "error event"
                        return
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    self.chunks += 1
                    self.first_chunk.set()
                self.outcome = f"closed ({finish})"
        except httpx.TimeoutException as e:
            self.outcome = f"hung ({type(e).__name__})"
        except httpx.HTTPError as e:
            self.outcome = f"error ({type(e).__name__})"
        finally:
            self.ended_at = time.monotonic()

    def cut_off(self) -> bool:
        """What a client of a dying server must see: an error, or a stream that ended early (closed, or
        finished as "abort"), never a normal finish."""
        return self.outcome.startswith(("error", "closed (None)", "closed (abort)", "done (abort)"))


def start_streams(url: str, n: int = STREAMS) -> list[Stream]:
    streams = [Stream(url) for _ in range(n)]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 60
    for s in streams:
        s.first_chunk.wait(max(0.0, deadline - time.monotonic()))
    assert all(s.first_chunk.is_set() for s in streams), [s.outcome for s in streams]
    return streams


def wait_streams(streams: list[Stream], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for s in streams:
        s.join(max(0.0, deadline - time.monotonic()))


# --- fixtures -----------------------------------------------------------------------------------------

def launch_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--served-name", TINY_NAME, "--dtype", "float32", *extra]


class Launch:
    """A launcher run directly (no waiting for ready), for faults during start-up. Kills whatever it
    started that is still alive on exit."""

    def __init__(self, *args: str) -> None:
        self.log_path = Path(f"/tmp/serve-test-faults-{os.getpid()}-{time.monotonic_ns()}.log")
        self.args = ["launch", "--port", str(free_port()), *args]
        self.seen: set[int] = set()

    def __enter__(self) -> Launch:
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def children(self) -> dict[int, str]:
        found = descendants(self.proc.pid)
        self.seen.update(found)
        return found

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def ipc_dir(self) -> str | None:
        m = re.search(r"ipc directory (/\S+)", self.read_log())
        return m.group(1) if m else None

    def __exit__(self, *exc) -> None:
        kill_all([self.proc.pid, *self.seen])
        self.proc.wait()
        self.log.close()
        self.log_path.unlink(missing_ok=True)


# --- 1. any child dies: a clean, loud stop -------------------------------------------------------------

@pytest.mark.parametrize("victim", ["api", "scheduler", "worker-0"])
def test_child_killed_while_streaming_stops_the_server(long_model, victim):
    with Server(*launch_args(long_model)) as server:
        launcher = server.proc.pid
        procs = [launcher, *descendants(launcher)]
        target = pid_titled(launcher, victim)
        streams = start_streams(server.url)
        assert all(s.outcome == "running" for s in streams)

        killed_at = time.monotonic()
        os.kill(target, signal.SIGKILL)

        seen_after, line = wait_for_log(server, rf"{victim} \(pid {target}\)", timeout=5)
        gone_after = wait_gone(procs, timeout=15)
        returncode = server.proc.wait(timeout=5)
        wait_streams(streams, timeout=5)
        print(f"\n{victim}: logged after {seen_after:.2f}s, everything gone after {gone_after:.2f}s, "
              f"clients ended after {max(s.ended_at or 1e9 for s in streams) - killed_at:.2f}s: {line}")

        assert line is not None, server.read_log()
        assert "ERROR" in line and "killed by SIGKILL" in line, line
        assert seen_after < 2.0
        assert gone_after < 10.0, {p: cmdline(p) for p in procs if alive(p)}
        assert returncode == 1
        assert not os.path.exists(server.ipc_dir)
        assert all(s.cut_off() for s in streams), [s.outcome for s in streams]
        assert all(s.ended_at is not None and s.ended_at - killed_at < 10.0 for s in streams)
        assert "Traceback" not in server.read_log()


@pytest.mark.parametrize("victim", ["tokenizer", "detokenizer"])
def test_stateless_stage_comes_back(long_model, victim):
    """Tokenizer and detokenizer keep nothing a restart cannot rebuild: the launcher starts a new one, ZeroMQ
    reconnects, the requests in flight end with an error, and new ones are served by the same server."""
    with Server(*launch_args(long_model)) as server:
        launcher = server.proc.pid
        old = pid_titled(launcher, victim)
        streams = start_streams(server.url, n=2)
        os.kill(old, signal.SIGKILL)
        seen_after, line = wait_for_log(server, rf"{victim} \(pid {old}\) was killed by SIGKILL; restarting it", timeout=5)
        wait_streams(streams, timeout=10)
        assert line is not None and seen_after < 2.0, server.read_log()
        assert [s.outcome for s in streams] == ["error event"] * 2
        with server.http() as http:
            # One probe, sent while the new process may still be starting: it waits in ZeroMQ's queues, and
            # its reply must not be lost while the api's DEALER reconnects (that cost health_timeout_s, 20 s).
            asked = time.monotonic()
            assert http.get("/health").status_code == 200
            assert time.monotonic() - asked < 8.0
            r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
            assert http.get("/stats").json()["running"] == 0
        new = pid_titled(launcher, victim)
        assert new != old and server.proc.poll() is None


def test_how_a_child_ended_is_put_in_words():
    from types import SimpleNamespace

    from serve.launch import how_it_ended

    assert how_it_ended(SimpleNamespace(exitcode=-signal.SIGKILL)) == "was killed by SIGKILL"
    assert how_it_ended(SimpleNamespace(exitcode=-signal.SIGSEGV)) == "was killed by SIGSEGV"
    assert how_it_ended(SimpleNamespace(exitcode=1)) == "exited with code 1"
    assert how_it_ended(SimpleNamespace(exitcode=0)) == "exited with code 0"


def test_child_failing_at_startup_stops_the_server_with_its_reason(tiny_model, tmp_path):
    # Weights that load as a file but lack a tensor: only the worker finds out, while starting.
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "no-norm"
    shutil.copytree(tiny_model, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    with Launch(*launch_args(folder)) as launch:
        try:
            returncode = launch.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running 60 s after a worker could not load:\n{launch.read_log()}")
        log = launch.read_log()
        assert returncode == 1
        assert re.search(r"ERROR .*worker-0 failed to start: KeyError: .*model\.norm\.weight", log), log
        assert "ready: " not in log
        assert launch.ipc_dir() and not os.path.exists(launch.ipc_dir()), log
        assert not descendants(launch.proc.pid)


def test_child_killed_during_startup_is_named(tiny_model):
    with Launch(*launch_args(tiny_model)) as launch:
        deadline = time.monotonic() + 60
        while not (worker := [p for p, c in launch.children().items() if c == "serve:worker-0"]):
            assert launch.proc.poll() is None and time.monotonic() < deadline, launch.read_log()
            time.sleep(0.01)
        procs = [launch.proc.pid, *launch.children()]
        os.kill(worker[0], signal.SIGKILL)
        gone_after = wait_gone(procs, timeout=15)
        returncode = launch.proc.wait(timeout=5)
        log = launch.read_log()
        print(f"\nkilled during start-up: everything gone after {gone_after:.2f}s")
        assert returncode == 1
        assert "ready: " not in log, "the worker was killed too late: the server was already up"
        assert re.search(rf"ERROR .*worker-0 \(pid {worker[0]}\) was killed by SIGKILL during start-up", log), log
        assert gone_after < 10.0
        assert launch.ipc_dir() and not os.path.exists(launch.ipc_dir())


# --- the launcher itself is killed ----------------------------------------------------------------------

def test_killed_launcher_takes_every_child_along(long_model):
    with Server(*launch_args(long_model)) as server:
        procs = list(descendants(server.proc.pid))
        streams = start_streams(server.url)
        killed_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGKILL)
        gone_after = wait_gone(procs, timeout=10)
        wait_streams(streams, timeout=10)
        print(f"\nlauncher SIGKILLed: every child gone after {gone_after:.2f}s")
        try:
            assert gone_after < 5.0, {p: cmdline(p) for p in procs if alive(p)}
            assert all(s.cut_off() and s.ended_at - killed_at < 5.0 for s in streams), [s.outcome for s in streams]
            # The janitor process removes the ipc directory once the children are gone.
            deadline = time.monotonic() + 5
            while os.path.exists(server.ipc_dir) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.path.exists(server.ipc_dir), os.listdir(server.ipc_dir)
        finally:
            shutil.rmtree(server.ipc_dir, ignore_errors=True)


def test_children_import_nothing_heavy_before_they_die_with_the_launcher(tiny_model, tmp_path):
    """What `spawn` does in a child before `child_main` (and its die_with_parent) runs: import the
    launcher's main module and unpickle the call. None of it may import a heavy library: those are
    seconds in which the launcher's death would go unnoticed. Each child imports its own code later."""
    from multiprocessing.reduction import ForkingPickler

    from serve.cluster import Layout
    from serve.config import Config
    from serve.ipc import Endpoints
    from serve.launch import _children
    from serve.model_files import resolve_model
    from serve.proc import child_main

    config = Config()
    config.model.path, config.engine.tp = str(tiny_model), 2
    model, eps = resolve_model(config), Endpoints(str(tmp_path))
    calls = [(child_main, (name, "info", os.getpid(), eps.launcher, target, config, model, eps, *extra))
             for name, target, *extra in _children(Layout.of(config))]
    heavy = ["torch", "transformers", "fastapi", "uvicorn", "starlette", "pydantic", "tokenizers", "jinja2", "numpy"]
    probe = (f"import pickle, sys; import serve.cli; pickle.loads(sys.stdin.buffer.read()); "
             f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], input=bytes(ForkingPickler.dumps(calls)), capture_output=True,
                         timeout=60, check=True)
    assert out.stdout.decode().strip() == "[]", out


def test_launcher_killed_while_spawning_leaves_no_orphan(tiny_model):
    # Right after the last child is spawned, that child is still starting Python and unpickling its
    # arguments: a parent-death signal set only after its heavy imports would miss the launcher's death.
    with Launch(*launch_args(tiny_model)) as launch:
        deadline = time.monotonic() + 60
        while len(spawned := [c for c in launch.children().values() if "spawn_main" in c or c.startswith("serve:")]) < 5:
            assert launch.proc.poll() is None and time.monotonic() < deadline, launch.read_log()
            time.sleep(0.005)
        os.kill(launch.proc.pid, signal.SIGKILL)
        procs = list(launch.seen)  # the spawned children and multiprocessing's resource tracker
        early = sum(not c.startswith("serve:") for c in spawned)  # not yet past die_with_parent (titles come after)
        gone_after = wait_gone(procs, timeout=10)
        left = {p: cmdline(p) for p in procs if alive(p)}
        print(f"\nlauncher SIGKILLed while spawning ({early} of {len(spawned)} children before their parent-death "
              f"set-up): all {len(procs)} gone after {gone_after:.2f}s")
        if stale := launch.ipc_dir():
            shutil.rmtree(stale, ignore_errors=True)
        assert early, "every child was already up: this run did not hit the window the test is about"
        assert not left, left
        assert gone_after < 5.0


# --- 6. two servers, one machine ------------------------------------------------------------------------

def stale_ipc_dir(model: Path) -> str:
    """The ipc directory of an instance whose whole process group was SIGKILLed once every child was up
    and bound, its janitor too (as a machine's crash would leave it): socket files nobody listens on."""
    with Launch(*launch_args(model)) as launch:
        deadline = time.monotonic() + 60
        while "ready: " not in launch.read_log():
            assert launch.proc.poll() is None and time.monotonic() < deadline, launch.read_log()
            time.sleep(0.05)
        procs = list(launch.children())
        os.killpg(launch.proc.pid, signal.SIGKILL)
        assert wait_gone(procs, timeout=10) < 5.0
        stale = launch.ipc_dir()
    assert stale and {"launcher", "tokenizer", "scheduler", "plan", "outputs"} <= set(os.listdir(stale))
    return stale


def test_two_servers_side_by_side(tiny_model):
    stale = stale_ipc_dir(tiny_model)
    servers = [Server(*launch_args(tiny_model)), Server(*launch_args(tiny_model))]
    errors: list[BaseException] = []

    def enter(s: Server) -> None:
        try:
            s.__enter__()
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)

    # Started at the same moment, next to a dead instance's leftovers: nothing may collide.
    starters = [threading.Thread(target=enter, args=(s,)) for s in servers]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        assert not errors, errors
        a, b = servers
        assert a.port != b.port and len({a.ipc_dir, b.ipc_dir, stale}) == 3
        assert os.path.isdir(a.ipc_dir) and os.path.isdir(b.ipc_dir) and os.path.isdir(stale)

        prompts = ["The quick brown fox", "What is the capital of France?", "def add(a, b):", "Once upon a time"]
        answers: dict[tuple[int, str], str] = {}

        def ask(s: Server, prompt: str) -> None:
            reply = s.client().completions.create(model=TINY_NAME, prompt=prompt, max_tokens=24, temperature=0,
                                                  extra_body={"ignore_eos": True})
            answers[s.port, prompt] = reply.choices[0].text

        askers = [threading.Thread(target=ask, args=(s, p)) for s in servers for p in prompts]
        for t in askers:
            t.start()
        for t in askers:
            t.join(60)
        assert len(answers) == 2 * len(prompts)
        # Same model, greedy: both servers give the same text, so neither got the other's tokens.
        assert all(answers[a.port, p] == answers[b.port, p] for p in prompts), answers
        assert len({answers[a.port, p] for p in prompts}) == len(prompts)

        # Stopping one leaves the other, its ipc directory and its answers alone.
        assert a.stop() < 10 and a.returncode == 0 and not os.path.exists(a.ipc_dir)
        assert os.path.isdir(b.ipc_dir)
        assert httpx.get(f"{b.url}/health", timeout=30).status_code == 200
        reply = b.client().completions.create(model=TINY_NAME, prompt=prompts[0], max_tokens=24, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert reply.choices[0].text == answers[b.port, prompts[0]]
        assert b.stop() < 10 and b.returncode == 0 and not os.path.exists(b.ipc_dir)
    finally:
        for s in servers:
            if s.proc is not None:
                s.__exit__(None, None, None)
        shutil.rmtree(stale, ignore_errors=True)
