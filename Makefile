# The README's commands: `make demo` and `make test` (plus test-fast, lint, bench, figures). Each builds .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of PyTorch, pinned exactly (any other spelling pulls a multi-GB CUDA build).
TORCH  := torch==2.13.0

.PHONY: venv test test-fast demo bench figures lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[torch,test,data,sentence-bench,onnx,aot]'
	# jax2onnx without its declared pins (see the onnx extra in pyproject.toml).
	$(BIN)/pip install -q --no-deps 'jax2onnx>=0.17,<0.18'
	touch $@

test: venv
	$(BIN)/python -m pytest -q --durations=20 tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: venv
	$(BIN)/python -m train.pretrain --preset demo --output-dir runs/demo

# The pictures in docs/: the attention patterns, and the demo's curves from the run in $(DEMO_RUN)
# (made with `make demo`'s command when that directory holds no run yet).
DEMO_RUN ?= runs/demo
figures: venv
	$(BIN)/python -m longformer_jax.patterns --out docs/patterns
	test -f $(DEMO_RUN)/metrics.jsonl || $(BIN)/python -m train.pretrain --preset demo --output-dir $(DEMO_RUN)
	$(BIN)/python -m train.metrics $(DEMO_RUN) --out docs/demo_curves.png

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
