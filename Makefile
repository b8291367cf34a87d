# Two commands on a fresh machine:  make demo   and   make test
# The virtual environment lives in .venv; torch==2.13.0 (CPU build) is installed before the
# project so that pip never pulls a multi-GB CUDA build on a CPU machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,train,dicom-codecs
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup demo test test-slow test-gpu browser lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# Debian's chromium for the Playwright browser tests (Playwright's own browser download cannot
# run here). Skipped quietly when apt is unavailable; the browser tests then skip with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)) \
	  || echo "note: chromium could not be installed; browser tests will be skipped"; }

demo: setup
	$(VENV)/bin/longllava app --model demo --host $(HOST) --port $(PORT) --preload-samples

test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-slow: setup
	$(VENV)/bin/pytest -q -m slow

test-gpu: setup
	$(VENV)/bin/pytest -q -m gpu

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/longllava bench scan
	$(VENV)/bin/longllava bench images

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
