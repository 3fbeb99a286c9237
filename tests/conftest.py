from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from tests.server import Server
from tests.tiny_model import build_tiny_llama

TINY_NAME = "tiny-llama"

# Every process this session starts inherits this mark, so the leak check below counts our own leftovers
# and not those of another test run on the same machine.
SESSION_MARK = ("SERVE_TEST_SESSION", str(os.getpid()))
os.environ[SESSION_MARK[0]] = SESSION_MARK[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def long_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an 8k context: its streams outlive any test (the tiny model makes a few
    hundred tokens a second), so a stream that finishes normally was never cut off."""
    folder = tmp_path_factory.mktemp("models") / "tiny-long"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 8192}))
    return folder


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    """One server for every module that only talks to it (tests that stop or break a server start their own);
    tests compare counters before and after, never with absolute values."""
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", "--kv-pool-tokens", "4096",
                "--log-requests") as server:
        yield server


@pytest.fixture(scope="session")
def long_server(long_model):
    """A server of the 8k-context model, for streams that must still be running when a test acts on them
    (the tiny model makes ~1,000 tokens a second, so a 512-token context can run out before an abort lands)."""
    with Server("--model", str(long_model), "--served-name", TINY_NAME, "--dtype", "float32") as server:
        yield server


def our_servers() -> list[str]:
    """The server processes (pid and title) this test session started that are still running."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = p.environ().get(SESSION_MARK[0]) == SESSION_MARK[1]
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if ours and p.info["cmdline"] and p.info["cmdline"][0].startswith("serve:"):
            left.append(f"{p.info['pid']} {p.info['cmdline'][0]}")
    return left


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    left = our_servers()
    assert not left, f"server processes left behind by the test suite: {left}"
