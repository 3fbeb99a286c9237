"""Start a real `serve launch` in a subprocess, wait until it answers, and stop it as a user would (SIGTERM)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    def __init__(self, *args: str, startup_timeout: float = 240.0) -> None:
        self.port = free_port()
        self.args = ["launch", "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = b""
        self.proc: subprocess.Popen | None = None
        self.children: list[int] = []
        self.ipc_dir: str | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        self.logfile = tempfile.TemporaryFile()  # the server's output, gone with the test (read_log shows it)
        # A session of its own, like a server started from a terminal: Ctrl-C can then be sent to its
        # whole process group without reaching pytest.
        self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *self.args], stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            if "ready: " in self.read_log():
                break
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"server not ready after {self.startup_timeout}s:\n{self.read_log()}")
        self.children = children_of(self.proc.pid)
        m = re.search(r"ipc: (\S+)", self.read_log())
        self.ipc_dir = m.group(1) if m else None
        return self

    def read_log(self) -> str:
        self.logfile.seek(0)
        return self.logfile.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0, group: bool = False) -> float:
        """Signal the launcher (or, like Ctrl-C in a terminal, its whole process group); returns the
        seconds until it and every child were gone."""
        assert self.proc is not None
        started = time.monotonic()
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        while any(alive(p) for p in self.children) and time.monotonic() - started < timeout:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        for p in self.children:  # never leave anything behind, even when the test fails
            if alive(p):
                os.kill(p, signal.SIGKILL)
        return elapsed

    def __exit__(self, *exc) -> None:
        if self.returncode is None:
            self.stop()
        self.logfile.close()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)
