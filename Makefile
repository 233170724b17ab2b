# Two commands set everything up on a fresh machine:
#   make test    create .venv, install runtime + test requirements, run the suite
#   make train   create .venv, install runtime requirements, train the default config
#
# ACCEL picks the JAX build for the machine's accelerator:
#   make train ACCEL=cpu      (default) CPU-only jaxlib, what requirements.txt installs
#   make train ACCEL=cuda13   NVIDIA GPUs, CUDA 13 wheels (jax[cuda13]); cuda12 likewise
#   make train ACCEL=tpu      Cloud TPU VMs (jax[tpu], libtpu)
# The accelerator build is installed on top of the CPU one, once per ACCEL.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ACCEL ?= cpu
ACCEL_STAMP := $(VENV)/.installed-accel-$(ACCEL)
ACCELS := cpu cuda12 cuda13 tpu
CONFIG ?= experiments/shapes.py
WORKDIR ?= runs/shapes
# The accelerator machine of `experiments/device_check.py`: CPython 3.12, manylinux x86_64,
# no package index. `make device-wheels` fetches what its image lacks into .whl/.
DEVICE_WHEELS := ml-collections
WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform any

.PHONY: train test install install-dev device-wheels clean

ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error ACCEL=$(ACCEL) is not one of: $(ACCELS))
endif

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -qq -r requirements.txt
	$(PY) -m pip install -qq --no-deps -e .
	touch $@

# jax[EXTRA] at the jax version already installed, so the accelerator plugin matches jaxlib.
$(ACCEL_STAMP): $(STAMP)
	@if [ "$(ACCEL)" != cpu ]; then \
	  v=$$($(PY) -c "import jax; print(jax.__version__)"); \
	  echo "installing jax[$(ACCEL)]==$$v"; \
	  $(PY) -m pip install -qq "jax[$(ACCEL)]==$$v"; \
	fi
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install -qq -r requirements-dev.txt
	touch $@

install: $(ACCEL_STAMP)
install-dev: $(DEV_STAMP)

# Trains CONFIG into WORKDIR (resuming if it already holds checkpoints), then
# evaluates on the validation split and draws a few predictions.
train: $(ACCEL_STAMP)
	$(PY) -m maskrcnn_jax.train --config $(CONFIG) --workdir $(WORKDIR)
	@echo "Metrics: $(WORKDIR)/metrics.jsonl   Pictures: $(WORKDIR)/pictures/"

# Test files run on TEST_WORKERS processes (a file's tests stay together, so they share
# its compiled fixtures); the suite is bound by XLA compiles, one core each.
TEST_WORKERS ?= 2
test: $(DEV_STAMP)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

device-wheels: | $(PY)
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(WHEEL_PLATFORMS) -d .whl $(DEVICE_WHEELS)
	@ls .whl

clean:
	rm -rf $(VENV) .pytest_cache .whl
