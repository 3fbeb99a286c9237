from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server import Server
from tests.tiny_model import build_tiny_llama

TINY_NAME = "tiny-llama"


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
