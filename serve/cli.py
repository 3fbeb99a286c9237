"""`serve launch ...`: the command line. Problems the user can fix print one line and exit with code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serve.config import DEFAULT_CONFIG, ConfigError, apply_overrides, load_config, parse_settings
from serve.isa import LEVELS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", description="A compact LLM server: a ZeroMQ pipeline behind an OpenAI API.")
    sub = p.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="start a server")
    launch.add_argument("--config", help="YAML config file (see configs/)")
    launch.add_argument("--model", help="a Hugging Face folder or a .gguf file (overrides model.path)")
    launch.add_argument("--served-name", help="the model name clients use (overrides model.served_name)")
    launch.add_argument("--chat-template", help="a Jinja chat template file to use instead of the model's own (model.chat_template)")
    launch.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    launch.add_argument("--quantization", choices=["auto", "none", "int8"],
                        help="auto: a GGUF's own blocks (CPU); none: float weights; int8: quantized at load (CPU)")
    launch.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    launch.add_argument("--port", type=int)
    launch.add_argument("--tp", type=int, help="tensor-parallel ranks (worker processes)")
    launch.add_argument("--kv-pool-tokens", type=int)
    launch.add_argument("--chunked-prefill-tokens", type=int, help="per-step token budget with chunked prefill (0: off)")
    launch.add_argument("--no-prefix-cache", action="store_const", const=False, dest="prefix_cache", help="recompute every prompt")
    launch.add_argument("--no-overlap", action="store_const", const=False, dest="overlap", help="plan each step only after the last one ends")
    launch.add_argument("--kv-cache-dtype", choices=["auto", "float16", "float32", "int8"],
                        help="auto: float16 on a CPU, except for the float32 reference; int8: a scale per token and head")
    launch.add_argument("--no-cpu-kernels", action="store_const", const=False, dest="cpu_kernels", help="plain torch ops instead of our CPU kernels")
    launch.add_argument("--cpu-isa", choices=["auto", *LEVELS], help="cap the CPU instruction set our kernels and oneDNN use (auto: the best here)")
    launch.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    launch.add_argument("--log-requests", action="store_const", const=True, help="log a line per finished request")
    launch.add_argument("--api-key", help="require this Bearer key on /v1/* and the other endpoints (not /health); default $SERVE_API_KEY")
    launch.add_argument("--nnodes", type=int, help="machines this server spans (each runs this same command); --tp is the total")
    launch.add_argument("--node-rank", type=int, help="this machine's place among them: 0 runs the api, 1.. only their ranks")
    launch.add_argument("--dist-init-addr", metavar="HOST:PORT", help="node 0's address; PORT to PORT+3 are used (default 127.0.0.1:25000)")
    launch.add_argument("--cluster-key", metavar="FILE", help="CURVE key file for the nodes' tcp traffic (node 0 creates it if missing)")
    launch.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config field, e.g. engine.max_running_requests=8")
    from serve import replicas
    from serve.bench import load, transports

    replicas.add_arguments(sub.add_parser("replicas", help="N servers behind the SGLang model gateway (smg), stopped together with Ctrl-C"))

    load.add_arguments(sub.add_parser("bench", help="load-test an OpenAI-compatible server (ours or another)"))
    transports.add_arguments(sub.add_parser("bench-zmq", help="ZeroMQ transports and patterns, measured on this machine"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("bench", "bench-zmq", "replicas"):
        return args.run(args)
    try:
        if args.config is None and args.model is None and DEFAULT_CONFIG.is_file():
            # As `make serve` does: a bare `serve launch` serves the default model.
            print(f"serve: no --config or --model given; serving {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)}", file=sys.stderr)
            args.config = str(DEFAULT_CONFIG)
        config = load_config(args.config)
        apply_overrides(config, {
            "model.path": args.model, "model.served_name": args.served_name, "model.dtype": args.dtype, "model.quantization": args.quantization,
            "model.chat_template": args.chat_template and str(Path(args.chat_template).resolve()),
            "server.host": args.host, "server.port": args.port, "engine.tp": args.tp,
            "engine.kv_pool_tokens": args.kv_pool_tokens, "server.log_level": args.log_level, "server.log_requests": args.log_requests,
            "engine.chunked_prefill_tokens": args.chunked_prefill_tokens, "engine.prefix_cache": args.prefix_cache,
            "engine.overlap": args.overlap, "engine.cpu_kernels": args.cpu_kernels, "engine.kv_cache_dtype": args.kv_cache_dtype,
            "engine.cpu_isa": args.cpu_isa,
            "cluster.nnodes": args.nnodes, "cluster.node_rank": args.node_rank, "cluster.dist_init_addr": args.dist_init_addr,
            "cluster.key_file": args.cluster_key and str(Path(args.cluster_key).resolve()),
            "server.api_key": args.api_key or os.environ.get("SERVE_API_KEY"),
            **parse_settings(args.set),
        })
        from serve.launch import run

        return run(config)
    except ConfigError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
