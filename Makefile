# The two commands a new user types: `make demo` and `make test`.
# Both create .venv on first use. torch goes in first and pinned, so that pip takes the
# CPU build on disk instead of fetching a multi-GB CUDA build for a looser requirement.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export AWS_EC2_METADATA_DISABLED := true
export DO_NOT_TRACK := 1

.PHONY: venv test lint demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
