"""Launching and stopping, as a user sees it: one-line errors with exit code 2, clean stops, nothing left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from serve.device import cpu_has_native_bf16
from serve.worker import native
from tests.conftest import TINY_NAME, our_servers
from tests.server import Server, alive


def launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", "launch", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  path: /nowhere\n  temprature: 1\n")
    assert_one_line_error(launch("--config", str(cfg)), "model.temprature")


def test_missing_model_file():
    assert_one_line_error(launch("--model", "/nowhere/model.gguf"), "/nowhere/model.gguf", "--model")


def test_unsupported_architecture(tmp_path, tiny_model):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert_one_line_error(launch("--model", str(folder)), "gpt2", "supported")


def test_port_in_use(tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(launch("--model", str(tiny_model), "--port", str(port)), str(port))


def test_child_failing_at_startup_is_named(tmp_path, tiny_model):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    port = str(Server().port)
    result = launch("--model", str(folder), "--port", port, timeout=120)
    assert result.returncode == 1
    assert "worker-0 failed to start" in result.stderr
    assert our_servers() == []


@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "Ctrl-C"])
def test_signal_stops_everything(tiny_model, sig, group):
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME) as server:
        assert len(server.children) >= 5 and os.path.isdir(server.ipc_dir)
        assert os.stat(server.ipc_dir).st_mode & 0o777 == 0o700  # other local users cannot reach the sockets
        elapsed = server.stop(sig, group=group)
        assert server.returncode == 0
        assert elapsed < 10
        assert not any(alive(p) for p in server.children)
        assert not os.path.exists(server.ipc_dir)


def test_tp2_gives_the_same_tokens_as_tp1(tiny_model, tiny_server):
    prompts = ["The quick brown fox", "What is the capital of France?", "def add(a, b):"]

    def run(server: Server) -> list[str]:
        client = server.client()
        return [client.completions.create(model=TINY_NAME, prompt=p, max_tokens=32, temperature=0).choices[0].text for p in prompts]

    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, "--tp", "2", "--dtype", "float32") as server:
        titles = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, server.children))], capture_output=True, text=True).stdout
        assert titles.count("serve:worker-") == 2
        tp2 = run(server)
    assert tp2 == run(tiny_server)  # the shared server: the same model at TP 1, float32


def test_startup_timeout_names_who_was_not_ready(tmp_path, tiny_model):
    cfg = tmp_path / "impatient.yaml"
    cfg.write_text(f"model:\n  path: {tiny_model}\nengine:\n  startup_timeout_s: 0.2\n")
    result = launch("--config", str(cfg), "--port", str(Server().port))
    assert result.returncode == 1
    assert "timed out after" in result.stderr and "waiting for:" in result.stderr and "worker-0" in result.stderr
    assert our_servers() == []


# On a CPU with our kernels, activations are float32 whatever the weights (serve/worker/formats.py).
KERNELS = native.cpu_supported()
HALF = "float32" if KERNELS else "bfloat16"


@pytest.mark.parametrize("flags, dtype, weights", [
    (["--dtype", "bfloat16"], HALF, "bfloat16"),
    (["--dtype", "float16", "--kv-cache-dtype", "float16"], "float16", "float16"),
    (["--dtype", "auto"], HALF if cpu_has_native_bf16() else "float32", "bfloat16" if cpu_has_native_bf16() else "float32"),
    (["--dtype", "float32", "--kv-cache-dtype", "float32"], "float32", "float32"),
    # int8 keeps float32 activations: auto resolves to float32 even where bfloat16 is native.
    (["--quantization", "int8"], "float32", "Q8_0"),
    # A chunk alone in its step samples nothing: the int8 matmul of the LM head then has 0 rows.
    (["--quantization", "int8", "--dtype", "float32", "--kv-cache-dtype", "float16", "--chunked-prefill-tokens", "16"], "float32", "Q8_0"),
    # The kernels of an AVX2-only CPU, on whatever CPU this is.
    (["--quantization", "int8", "--cpu-isa", "avx2"], "float32", "Q8_0"),
    # An int8 KV cache, through our kernels and through plain torch ops (as on CUDA).
    (["--quantization", "int8", "--kv-cache-dtype", "int8"], "float32", "Q8_0"),
    (["--dtype", "float32", "--kv-cache-dtype", "int8", "--no-cpu-kernels"], "float32", "float32"),
], ids=["bfloat16", "float16-f16kv", "auto", "float32-f32kv", "int8", "int8-f16kv-chunked", "int8-avx2", "int8-int8kv", "torch-int8kv"])
def test_every_dtype_serves(tiny_model, flags, dtype, weights):
    # What a user picks in the config is what the worker runs (its banner line says so), and it answers.
    int8 = "--quantization" in flags and flags[flags.index("--quantization") + 1] == "int8"
    if int8 and not KERNELS:
        pytest.skip("int8 runs on our CPU kernels, which this CPU cannot run")
    with Server("--model", str(tiny_model), "--served-name", TINY_NAME, *flags) as server:
        worker_line = next(line for line in server.read_log().splitlines() if "serve:worker-0" in line)
        assert f"dtype={dtype}" in worker_line and f"weights={weights}:" in worker_line
        if int8:
            assert "quantization=int8" in worker_line and "matmul=qgemm-" in worker_line
        if "--cpu-isa" in flags:
            assert "isa=avx2" in worker_line and "matmul=qgemm-avx2" in worker_line
        if "--kv-cache-dtype" in flags:
            assert f"kv_dtype={flags[flags.index('--kv-cache-dtype') + 1]}" in worker_line
        # The long prompt's one chunk goes through SDPA (engine.NATIVE_PREFILL_TOKENS), the others through decode attention.
        for prompt in ("Once upon a time", "Once upon a time, " * 12, "Once upon a time, " * 60):
            reply = server.client().completions.create(model=TINY_NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                       extra_body={"ignore_eos": True})
            assert reply.usage.completion_tokens == 8 and reply.choices[0].text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int8_with_a_half_dtype_is_refused_with_what_works(tiny_model, dtype):
    result = launch("--model", str(tiny_model), "--quantization", "int8", "--dtype", dtype, "--kv-cache-dtype", "float16")
    assert_one_line_error(result, "int8", "dtype auto or float32", "--quantization none")


def test_an_unknown_cpu_isa_is_refused(tiny_model):
    assert_one_line_error(launch("--model", str(tiny_model), "--set", "engine.cpu_isa=sse4"), "engine.cpu_isa", "avx2")
