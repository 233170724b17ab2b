# Two commands set everything up on a fresh machine:
#   make test    create .venv, install runtime + test requirements, run the suite
#   make train   create .venv, install runtime requirements, train the default config
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
CONFIG ?= experiments/shapes.py
WORKDIR ?= runs/shapes

.PHONY: train test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -qq -r requirements.txt
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install -qq -r requirements-dev.txt
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

# Trains CONFIG into WORKDIR (resuming if it already holds checkpoints), then
# evaluates on the validation split and draws a few predictions.
train: $(STAMP)
	$(PY) -m maskrcnn_jax.train --config $(CONFIG) --workdir $(WORKDIR)
	@echo "Metrics: $(WORKDIR)/metrics.jsonl   Pictures: $(WORKDIR)/pictures/"

test: $(DEV_STAMP)
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) .pytest_cache
