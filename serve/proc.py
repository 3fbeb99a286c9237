"""Processes: what every child does first (a title for `ps`, death with its parent, a readiness report),
a server's processes as /pipeline shows them, and the janitor that cleans up after a launcher however it died."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask the kernel to kill us when the launcher dies, and watch the parent as a second line of defence
    (the death signal follows the parent *thread*, and is not available off Linux). `parent` is the pid
    of the process that spawned us, passed along so that a parent dead before this call counts too;
    without it, whoever is our parent now."""
    if parent is None:
        parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    # The death signal only covers a death after this call; a launcher that died while we started up
    # has already made us an orphan, and we must not go on to serve.
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def setup_logging(name: str, level: str) -> logging.Logger:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s [{name}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    return logging.getLogger(f"serve.{name}")


class Reporter:
    """Tells the launcher this child is ready, or why it failed to start."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.sent_ready = False

    def _send(self, msg: object) -> None:
        import zmq

        from serve.ipc import send, socket

        ctx = zmq.Context.instance()
        sock = socket(ctx, zmq.PUSH, self.endpoint, bind=False)
        sock.setsockopt(zmq.LINGER, 2000)  # this one message must get out before we exit
        send(sock, msg)
        sock.close()

    def ready(self, **info: Any) -> None:
        from serve.ipc import OPENED
        from serve.messages import Ready

        self._send(Ready(self.name, os.getpid(), {**info, "sockets": list(OPENED)}))
        self.sent_ready = True

    def failed(self, error: str) -> None:
        from serve.messages import StartupFailed

        self._send(StartupFailed(self.name, error))

    def told(self) -> None:
        from serve.messages import Told

        self._send(Told(self.name))

    def crashed(self, error: str) -> None:
        from serve.messages import Crashed

        self._send(Crashed(self.name, error))


def last_words(e: BaseException) -> str:
    """An exception as one short line: gloo's, for one, start with a source path and end in advice."""
    first = (str(e).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\] ", "", first)
    return f"{type(e).__name__}: {first[:160]}"


def child_main(name: str, log_level: str, parent: int, launcher_endpoint: str, target: str, *args: Any) -> None:
    """Entry point of every spawned child: `target(reporter, *args)` runs the process's loop.

    `target` is "module:function", imported only here: `spawn` unpickles this call's arguments before it
    runs, and a function passed by reference would import its module (fastapi, tokenizers, ...) then,
    seconds during which the launcher's death would go unnoticed. This module and the arguments' own
    modules (config, model_files, ipc) stay light."""
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group; the launcher alone decides how the server stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from setproctitle import setproctitle

    setproctitle(f"serve:{name}")
    log = setup_logging(name, log_level)
    reporter = Reporter(name, launcher_endpoint)
    try:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(reporter, *args)
    except Exception as e:
        if not reporter.sent_ready:
            reporter.failed(f"{type(e).__name__}: {e}")
            log.debug("start-up failed:\n%s", traceback.format_exc())
        else:
            log.error("crashed:\n%s", traceback.format_exc())
            reporter.crashed(last_words(e))
        sys.exit(1)


class Processes:
    """The `serve:` processes of one server (a launcher and its children, found by their titles) with pid,
    state, CPU and memory, for /pipeline. psutil handles are kept between calls: CPU percent is measured
    from one call to the next."""

    def __init__(self, launcher: int | None = None) -> None:
        self.launcher = launcher  # default: our parent (the api asks about its launcher)
        self.known: dict = {}

    def snapshot(self) -> list[dict]:
        import psutil

        try:
            launcher = psutil.Process(self.launcher or os.getppid())
            procs = [launcher, *launcher.children()]
        except psutil.NoSuchProcess:
            procs = [psutil.Process()]
        out = []
        for p in procs:
            p = self.known.setdefault(p.pid, p)
            try:
                with p.oneshot():
                    title = (p.cmdline() or [""])[0]
                    if not title.startswith("serve:"):
                        continue  # e.g. multiprocessing's resource tracker
                    out.append({"name": title.removeprefix("serve:"), "pid": p.pid, "state": p.status(),
                                "cpu_percent": p.cpu_percent(), "rss_bytes": p.memory_info().rss})
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        live = {p["pid"] for p in out}
        self.known = {pid: p for pid, p in self.known.items() if pid in live}
        return out


# Run by a small process of its own beside the launcher: it blocks until the launcher's end of a pipe
# closes, which any death closes, SIGKILL included; then, once the children (killed with the launcher)
# are gone, it removes the ipc directory. Ctrl-C and SIGTERM to the process group do not stop it early.
_JANITOR = """import shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
if sys.stdin.buffer.read() != b"removed":  # what a launcher that cleaned up says before it closes
    time.sleep(1.0)
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


def janitor(ipc_dir: str) -> subprocess.Popen:
    """The process that removes `ipc_dir` when the launcher is gone, however it went."""
    return subprocess.Popen([sys.executable, "-c", _JANITOR, ipc_dir], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
