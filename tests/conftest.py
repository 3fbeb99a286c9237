from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.server import Server
from tests.tiny_model import build_tiny_llama

TINY_NAME = "tiny-llama"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--dtype", "float32", "--kv-pool-tokens", "4096") as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    left = subprocess.run(["pgrep", "-f", "serve:(api|tokenizer|scheduler|worker|detokenizer|launcher)"],
                          capture_output=True, text=True).stdout.split()
    assert not left, f"server processes left behind by the test suite: {left}"
