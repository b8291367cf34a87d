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

.PHONY: setup demo demo-model test test-slow test-gpu browser lint bench clean

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

# Retrain the bundled demo model from scratch and score it (roughly 1.5 h on 2 CPU cores: data,
# five training stages of about 57 minutes, held-out scoring); writes build/, then copies the result over
# longllava/checkpoints/demo. See that folder's MODEL_CARD.md.
demo-model: setup
	$(PY) -m finetune.demo_data --out build/synthetic --seed 0 --vision-tile-scenes 1250 --tile-copies 3 --tile-replay 7000
	$(PY) -c "from finetune.demo_data import build_heldout_subset as b; b('build/heldout20', 20, 20)"
	$(VENV)/bin/longllava finetune demo_vision
	$(VENV)/bin/longllava finetune demo_vision_tiles
	$(VENV)/bin/longllava finetune demo_warmup
	$(VENV)/bin/longllava finetune demo
	$(VENV)/bin/longllava finetune demo_polish
	$(PY) -m finetune.demo_scores --model build/demo_polish/model --data build/heldout20 --out build/demo_eval \
	  --export build/demo_polish longllava/checkpoints/demo

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
