# Two entry points: `make demo` (the main job on the embedded synthetic data) and `make test`.
# Both create .venv on first use and install the project with the extras they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Nothing in the demo or the tests may reach a model or dataset hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TRANSFORMERS_VERBOSITY := error
export PYTHONUNBUFFERED := 1

PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-slow test-all test-hf ablation install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23"

$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	@# the distribution was called "cgns" before it became cm-cgns: drop a stale editable install of that name
	$(BIN)/python -m pip uninstall --quiet --yes cgns 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

# transformers' own generic model/config tests against CGNS (tests_hf/): the test files come from the
# transformers sdist, fetched by pip into the ignored .hf_tests/ (with their one extra dependency).
# A separate tier: about 7 min on 2 shared CPU cores (measured), too long for `make test`.
test-hf: install
	$(BIN)/python tests_hf/fetch_transformers_tests.py --dest .hf_tests
	$(BIN)/python -m pytest tests_hf -m hf_common -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m "slow" -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python demo.py $(DEMO_ARGS)

ablation: install
	$(BIN)/python demo.py --ablation $(DEMO_ARGS)

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_heads.py
	$(BIN)/python benchmarks/bench_clustering.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_linear_probe.py
	$(BIN)/python benchmarks/bench_input_pipeline.py
	$(BIN)/python benchmarks/bench_retrieval.py

clean:
	rm -rf outputs .pytest_cache build dist *.egg-info .hf_tests
