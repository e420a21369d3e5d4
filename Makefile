# The README's commands: `make demo` and `make test` (plus test-fast, lint, bench). Each builds .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of PyTorch, pinned exactly (any other spelling pulls a multi-GB CUDA build).
TORCH  := torch==2.13.0

.PHONY: venv test test-fast demo bench lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[torch,test,data,sentence-bench,onnx]'
	# jax2onnx without its declared pins (see the onnx extra in pyproject.toml).
	$(BIN)/pip install -q --no-deps 'jax2onnx>=0.17,<0.18'
	touch $@

test: venv
	$(BIN)/python -m pytest -q --durations=20 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: venv
	$(BIN)/python -m train.pretrain --preset demo --output-dir runs/demo

bench: venv
	$(BIN)/python -m bench.run --quick

lint: venv
	$(BIN)/ruff check longformer_jax convert train bench tests
	$(BIN)/ruff format --check longformer_jax convert train bench tests

format: venv
	$(BIN)/ruff format longformer_jax convert train bench tests
	$(BIN)/ruff check --fix longformer_jax convert train bench tests

clean:
	rm -rf $(VENV) runs .pytest_cache
