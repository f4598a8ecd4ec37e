# The README's two commands: `make demo` (main job, offline default) and `make test`.
# Both create .venv if missing. torch==2.13.0 is installed first and kept pinned
# in every pip call: an unpinned resolve pulls a multi-GB CUDA build.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv assets demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	touch $(STAMP)

# Offline model weights and corpus, prepared once under $$FCSAE_HOME (~/.cache/fcsae).
assets: venv
	$(BIN)/fcsae prepare

# A rerun continues (or, when finished, just reprints) the earlier experiment: it never deletes work.
demo: assets
	$(BIN)/fcsae-sweep --space search_spaces/quickstart.yaml $$(test -f experiments/quickstart/sweep.json && echo --resume)

test: assets
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q -m 'not slow' tests

bench: assets
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
