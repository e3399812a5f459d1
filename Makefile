# Two commands on a fresh machine: `make demo` and `make test`. Everything installs itself into .venv with pip
# (uv/poetry would ignore the local torch wheels and download ~3 GB).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One environment: every install goes through constraints.txt (torch, ray, mlflow and the rest pinned). torch's
# version comes from there; its build from the index: the default (PyPI, or this machine's local disk) or e.g.
# `make install TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu126'`. Another torch version: point
# CONSTRAINTS at your own file.
CONSTRAINTS ?= constraints.txt
TORCH_SPEC ?= torch torchvision
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
export ICH_HOME ?= $(CURDIR)/.ich

.PHONY: install demo test bench ui clean lock

# dev: the tests; head: the cluster head's extras (mlflow[auth], boto3), so nodes that reuse this venv run its commands;
# system: MLflow's system metrics on trial runs (psutil, nvidia-ml-py; the GPU configs turn them on).
EXTRAS := dev,head,system
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH_SPEC) $(TORCH_INDEX)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: digits -> ingest -> the paper's baselines (tiny CPU versions) and the
# CoAtNet sweep on local Ray + a local MLflow server -> soups -> report. `ich sweep` = `python sweeps/coatnet.py`
# (same options); add --verbose for Ray Tune's own tables.
demo: $(STAMP)
	$(BIN)/ich sweep --demo --config sweeps/configs/baselines-cpu.yaml --experiment ich-demo --no-soups
	$(BIN)/ich sweep --demo --experiment ich-demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

ui: $(STAMP)
	$(BIN)/ich ui

# A full lock: constraints.txt pins every distribution of a fresh venv built with the install's steps (through the
# current constraints, then pip check), so CI installs exactly what was tested. Pins keep their place and comments;
# the rest are listed at the end; torch's line stays a version without a build label (tools/lock.py). A new
# dependency comes in at the newest version its range allows; to move a pin, edit or delete its line, `make lock`,
# then `make install`. tests/test_lock.py checks that this venv holds nothing the lock does not pin. LOCK_FILE is
# the file rewritten (default: the constraints installed through).
LOCK_VENV ?= /tmp/ich-lock-venv
LOCK_FILE ?= $(CONSTRAINTS)
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -c $(CONSTRAINTS) $(TORCH_SPEC) $(TORCH_INDEX)
	$(LOCK_VENV)/bin/pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(LOCK_VENV)/bin/pip check
	$(LOCK_VENV)/bin/pip freeze --all --exclude-editable > $(LOCK_VENV)/frozen.txt
	$(PYTHON) tools/lock.py $(LOCK_FILE) < $(LOCK_VENV)/frozen.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf .ich .pytest_cache
