# Würstchen workbench. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= tiny
# The tiny networks gain nothing from more intra-op threads, and on a shared 2-core machine several threads
# oversubscribe the cores (tens of times slower): the notebooks run single-threaded unless told otherwise.
# The tiny training phases use the second core through a second process instead (`workers`, train.fit_processes).
THREADS ?= 1
# torch/torchvision are pinned so that every run is reproducible (the 2.13 CPU wheel + PyPI torchvision fails to import).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
# Debian's Chromium: the rating page's browser test (Playwright drives it; no browser is downloaded)
CHROMIUM := /usr/bin/chromium
# JupyterLab refuses to start as root without --allow-root, and these machines run as root.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL := -p no:cacheprovider --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900

.PHONY: help install fonts chromium test test-unit test-notebooks test-slow reproduce reports lab clean-runs

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP) fonts chromium ## create .venv with the pinned torch and the package with its dev extras

fonts: ## install Noto Color Emoji (Debian fonts-noto-color-emoji) for the emoji dataset, where possible
	@if [ -f "$(EMOJI_FONT)" ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji) >/dev/null; \
	else echo "note: $(EMOJI_FONT) missing; install the Debian package fonts-noto-color-emoji for the emoji dataset"; fi

chromium: ## install Debian's chromium for the rating page's browser test, where possible
	@if [ -x "$(CHROMIUM)" ]; then true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; \
	else echo "note: $(CHROMIUM) missing; install the Debian package chromium for the browser test (it skips)"; fi

test: install ## the whole suite: unit tests, then nbval over every notebook on the smoke profile
	$(PY) -m pytest -m "not slow" tests
	OMP_NUM_THREADS=$(THREADS) WURST_PROFILE=smoke WURST_REPORTS_DIR=$$(mktemp -d) $(PY) -m pytest $(NBVAL) notebooks/

test-unit: install ## unit tests only
	$(PY) -m pytest -m "not slow" tests

test-notebooks: install ## nbval over every notebook on the smoke profile
	OMP_NUM_THREADS=$(THREADS) WURST_PROFILE=smoke WURST_REPORTS_DIR=$$(mktemp -d) $(PY) -m pytest $(NBVAL) notebooks/

test-slow: install ## the slow tests (minutes)
	$(PY) -m pytest -m slow tests

reproduce: install ## the main job: every notebook on the tiny profile (CPU), writing reports/
	OMP_NUM_THREADS=$(THREADS) $(PY) -m wurst_core reproduce --profile $(PROFILE)

reports: install ## rebuild reports/index.md from the latest runs (no training)
	$(PY) -m wurst_core report --profile $(PROFILE)

lab: install ## JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

clean-runs: ## delete reports/runs (executed notebooks, checkpoints)
	rm -rf reports/runs
