"""Configuration: YAML files mapped onto dataclasses, with CLI flags overriding single fields.

One `Config` object is built by the launcher and handed to every child process; nothing looks
configuration up from globals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve import isa


# What a bare `serve launch` serves (the repository's default config, which `make serve` names too).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-instruct.yaml"


class ConfigError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with code 2."""


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a .gguf file, or "package:<python package>/<file>" for weights
    # shipped inside an installed Python package (the default SmolLM2 comes that way).
    path: str = ""
    # The name clients pass as "model"; defaults to the folder or file name.
    served_name: str = ""
    # auto | float32 | bfloat16 | float16. auto: on a CPU, float32 activations (our kernels' dtype) with the
    # weights as below; bfloat16 weights where the CPU has native bfloat16 dot products. On CUDA, bfloat16.
    dtype: str = "auto"
    # auto | none | int8 (serve/worker/formats.py). auto: a GGUF runs from its own quantized blocks on a CPU
    # (dequantized on CUDA); a float checkpoint stays float. none: float weights in `dtype` (a GGUF
    # dequantized at load). int8: float weights quantized at load to int8 blocks of 32 (CPU).
    quantization: str = "auto"
    # A Jinja chat template file to use instead of the model's own. Requests with tools, to a template that
    # shows none (SmolLM2's is plain ChatML), get serve's Hermes-style one (serve/tokenizer/hermes.jinja).
    chat_template: str = ""


@dataclass
class EngineConfig:
    tp: int = 1
    # KV pool size in tokens, shared by all running requests.
    kv_pool_tokens: int = 32768
    max_running_requests: int = 64
    # Requests queued behind the running ones; beyond this a new request gets 503 with Retry-After.
    max_waiting_requests: int = 1024
    # 0 means the model's own context length.
    max_model_len: int = 0
    # Chunked prefill: each step decodes every running request and adds up to this many prompt tokens
    # (a long prompt goes in chunks), so a long prompt never stalls running streams. 0: prompts are
    # prefilled whole, in steps of their own holding up to max_prefill_tokens.
    chunked_prefill_tokens: int = 256
    max_prefill_tokens: int = 4096
    # Reuse the KV of shared prompt prefixes (radix tree in the scheduler).
    prefix_cache: bool = True
    # Plan the next step while the workers run the current one.
    overlap: bool = True
    # Seconds the launcher waits for every child to report ready (model loading included).
    startup_timeout_s: float = 600.0
    # Worker threads per rank; 0 means cores / tp.
    threads_per_rank: int = 0
    # float32 on CPU: run the layers' small ops, decode attention and (with int8) few-row matmuls as our
    # fused kernels (serve/worker/csrc/, compiled once per machine). false: plain torch ops.
    cpu_kernels: bool = True
    # The KV cache's dtype: auto, float16 or float32. auto: float16 on a CPU unless the model runs as the
    # float32 reference (float32 weights, no quantization), where it is float32; on CUDA the model's dtype.
    # float16 halves the cache's memory and the bytes decode attention reads (llama.cpp's default too).
    kv_cache_dtype: str = "auto"
    # The highest x86 instruction-set level our kernels and oneDNN may use (serve/isa.py): auto (this CPU's
    # best, or $SERVE_CPU_ISA when set), avx2, avx_vnni, avx512, avx512_bf16 or amx. A lower one runs
    # the paths of an older CPU here: dtype auto then sees no native bfloat16 below avx512_bf16.
    cpu_isa: str = "auto"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    max_body_mb: float = 8.0  # a larger request body gets 413
    # Clients must send "Authorization: Bearer <key>" (all but /health and /version); empty: no key.
    api_key: str = ""
    # /health answers 503 when a probe through tokenizer, scheduler and detokenizer takes longer than
    # this, or when a step has been running on the workers for longer.
    health_timeout_s: float = 20.0
    # How long a stop waits for children to exit before killing them.
    shutdown_timeout_s: float = 5.0
    # One log line per finished request (id, tokens in and out, time to first token, duration, finish reason).
    log_requests: bool = False


@dataclass
class ClusterConfig:
    """Tensor parallelism over several machines (serve/cluster.py): every node runs the same command, with
    its own node_rank; engine.tp is the total over all nodes."""

    nnodes: int = 1
    node_rank: int = 0
    # Node 0's address and a port: torch.distributed's store listens on PORT, our ZeroMQ tcp endpoints on
    # PORT+1..PORT+3, bound on this address only.
    dist_init_addr: str = "127.0.0.1:25000"
    # The CURVE key pair every node's tcp traffic is encrypted and admitted with. Node 0 writes a new one
    # there if the file does not exist; copy it to the other nodes. Needed with nnodes > 1.
    key_file: str = ""
    # How long node 0 waits for every other node to join (and a node R for node 0) before giving up.
    join_timeout_s: float = 300.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys under {where.rstrip('.') or 'the top level'}: {', '.join(known)}"
        )
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value or {}, f"{where}{name}.")
        else:
            values[name] = _coerce(value, type(default), f"{where}{name}")
    return cls(**values)


def _coerce(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {name} must be {kind.__name__}, got {value!r}")
    return value


def load_config(path: str | None) -> Config:
    if path is None:
        return Config()
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found; pass --config with a YAML file such as configs/smollm2-135m-instruct.yaml")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return _build(Config, data, "")


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted fields ("engine.tp") from CLI flags; None means the flag was not given."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, name = dotted.split(".")
        setattr(getattr(config, section), name, value)
    validate(config)
    return config


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` flags (values in YAML syntax) as typed overrides."""
    out: dict[str, Any] = {}
    for item in items:
        dotted, sep, raw = item.partition("=")
        section, _, name = dotted.partition(".")
        data = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
        if not sep or section not in data or name not in {f.name for f in dataclasses.fields(data[section])}:
            raise ConfigError(f"--set {item}: expected SECTION.KEY=VALUE with a known key, e.g. engine.prefix_cache=false")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out[dotted] = _coerce(value, type(getattr(data[section], name)), dotted)
    return out


def validate(config: Config) -> None:
    if config.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16, got {config.model.dtype!r}")
    if config.model.quantization not in ("auto", "none", "int8"):
        raise ConfigError(f"model.quantization must be auto, none or int8, got {config.model.quantization!r}")
    if config.model.quantization == "int8" and config.model.dtype not in ("auto", "float32"):
        raise ConfigError(f"model.quantization: int8 runs its activations in float32, so it needs dtype auto or float32, "
                          f"not {config.model.dtype}; pass --dtype auto, or --quantization none to keep {config.model.dtype}")
    if config.engine.kv_cache_dtype not in ("auto", "float16", "float32", "int8"):
        raise ConfigError(f"engine.kv_cache_dtype must be auto, float16, float32 or int8, got {config.engine.kv_cache_dtype!r}")
    if config.model.chat_template and not Path(config.model.chat_template).is_file():
        raise ConfigError(f"model.chat_template: no such file {config.model.chat_template}")
    try:
        isa.check(config.engine.cpu_isa)
    except ValueError as e:
        raise ConfigError(f"engine.{e}") from None
    if config.engine.tp < 1:
        raise ConfigError(f"engine.tp must be at least 1, got {config.engine.tp}")
    if not 0 < config.server.max_body_mb <= 32:
        raise ConfigError("server.max_body_mb must be between 0 and 32 (ZeroMQ messages are capped at 64 MB)")
    if config.engine.max_running_requests < 1 or config.engine.kv_pool_tokens < 16:
        raise ConfigError("engine.max_running_requests must be >= 1 and engine.kv_pool_tokens >= 16")
    if config.engine.chunked_prefill_tokens < 0 or config.engine.max_prefill_tokens < 1:
        raise ConfigError("engine.chunked_prefill_tokens must be >= 0 (0: off) and engine.max_prefill_tokens >= 1")
    if not config.model.path:
        raise ConfigError("no model given: set model.path in the config or pass --model PATH")
    _validate_cluster(config)


def split_addr(addr: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" as (host, port)."""
    host, sep, port = addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 - 3:
        raise ConfigError(f"cluster.dist_init_addr must be HOST:PORT (node 0's address and a free port, "
                          f"e.g. 10.0.0.1:25000; PORT to PORT+3 are used), got {addr!r}")
    return host, int(port)


def _validate_cluster(config: Config) -> None:
    c = config.cluster
    if c.nnodes < 1 or not 0 <= c.node_rank < c.nnodes:
        raise ConfigError(f"cluster: --node-rank must be 0 to nnodes - 1 and --nnodes at least 1, got node rank "
                          f"{c.node_rank} of {c.nnodes}")
    if c.nnodes == 1:
        return
    if config.engine.tp % c.nnodes:
        raise ConfigError(f"engine.tp ({config.engine.tp}) must be a multiple of cluster.nnodes ({c.nnodes}): "
                          f"--tp is the total over all nodes, e.g. --tp {c.nnodes} for one rank per node")
    split_addr(c.dist_init_addr)
    if not c.key_file:
        raise ConfigError("cluster: more than one node needs --cluster-key FILE (node 0 writes a new key there if "
                          "there is none; copy that file to every other node)")
    if c.node_rank > 0 and not Path(c.key_file).is_file():
        raise ConfigError(f"cluster.key_file {c.key_file} not found: copy the key file node 0 wrote to this node")
