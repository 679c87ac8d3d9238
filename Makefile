# `make demo` and `make test` do all the set-up themselves: they create .venv and install
# CPU torch (pinned: an open range pulls a multi-GB CUDA build) and the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.switchyard-installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py $(ARGS)

test: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest -q -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) bench/mixed_batch.py --reps 5 --new-tokens 1 16 64 --json bench/mixed_batch.json
	$(PY) bench/plot_mixed_batch.py bench/mixed_batch.json bench/mixed_batch.png
	$(PY) bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache demo_out
