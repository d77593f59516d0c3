# mrcnn_edu: every target sets up .venv itself (Python 3.11, the tested torch pair, the package).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mrcnn_edu-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help setup demo demo-keypoints test test-full test-browser lab bench lint clean

help:
	@echo "make demo          set up .venv, train on the shapes set for 10 minutes, evaluate, draw"
	@echo "make demo-keypoints  the same for Keypoint R-CNN on the stick figures (15 minutes)"
	@echo "make test          set up .venv, lint (ruff), run the tests and doctests (notebooks in quick mode)"
	@echo "make test-full     the same with the slow tests (notebooks in full mode)"
	@echo "make test-browser  run the notebooks in JupyterLab in headless Chromium"
	@echo "make lint          ruff check and ruff format --check"
	@echo "make bench         the operator benchmarks (benchmarks/RESULTS.md)"
	@echo "make lab           open JupyterLab on notebooks/"

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (mrcnn_edu)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mrcnn-edu demo --data data/shapes --out build/demo --minutes 10

demo-keypoints: $(STAMP)
	$(BIN)/mrcnn-edu demo --preset stick-figures --data data/shapes_keypoints --out build/demo-keypoints --minutes 15

# lint first, then the tests and the doctests of mrcnn_edu (pyproject: --doctest-modules)
test: $(STAMP) lint
	MRCNN_EDU_QUICK=1 $(BIN)/python -m pytest -q -m "not slow" tests mrcnn_edu

test-full: $(STAMP)
	MRCNN_EDU_FULL=1 $(BIN)/python -m pytest -q -m slow tests/test_notebooks.py

test-browser: $(STAMP)
	bash tests/browser/setup.sh $(BIN)/python
	MRCNN_EDU_QUICK=1 MRCNN_EDU_BROWSER=1 $(BIN)/python -m pytest -q -m browser tests/browser

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ops.py --plot build/bench_ops.png

LINT_PATHS := mrcnn_edu tests benchmarks scripts conftest.py

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

clean:
	rm -rf build .pytest_cache
