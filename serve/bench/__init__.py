"""Benchmarks a user runs from the CLI: `serve bench` (load on an HTTP endpoint) and `serve bench-zmq` (transports)."""
