# Two commands on a fresh machine: `make demo` and `make test`. Everything installs itself into .venv with pip
# (uv/poetry would ignore the local torch wheels and download ~3 GB).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines here serve this pair from local disk; on a GPU box pick the build you need.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
export ICH_HOME ?= $(CURDIR)/.ich

.PHONY: install demo test bench ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: digits -> ingest -> the paper's baselines (tiny CPU versions) and the
# CoAtNet sweep on local Ray + a local MLflow server -> soups -> report.
demo: $(STAMP)
	$(BIN)/python sweeps/coatnet.py --demo --config sweeps/configs/baselines-cpu.yaml --experiment ich-demo --no-soups
	$(BIN)/python sweeps/coatnet.py --demo --experiment ich-demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

ui: $(STAMP)
	$(BIN)/ich ui

clean:
	rm -rf .ich .pytest_cache
