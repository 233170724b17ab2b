"""Shared test set-up: eight simulated CPU devices, tiny configs, shared tiny states.

The device-count flag must be set before JAX initialises its backend, so it
comes first. The fixtures that compile or build something are session-scoped
so that the test files share one copy:

- ``tiny_model_config(**overrides)``: a ResNet-18, width-8 model config that
  compiles and runs in seconds on CPU (factory).
- ``tiny_model``: ``(config, variables)`` of that config, ``init_model`` key 0.
- ``tiny_experiment_config(**train_overrides)``: ``experiments/tiny.py``'s
  config, fields of ``config.train`` overridden (factory).
- ``tiny_data_dir``: the tiny experiment's prepared dataset directory.
- ``tiny_train_batch``: ``(config, batch)``, one batch of 8 shapes images of the
  tiny experiment (``train.TRAIN_KEYS``).
- ``tiny_train_state``: ``(state, optimizer)`` at step 0 of the tiny experiment.
"""

import os
import shutil
import tempfile

import ml_collections
import pytest

# Before anything imports jax (JAX_PLATFORMS is read at import): the jax and
# maskrcnn_jax imports below are inside the functions.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Cheaper CPU code generation (LLVM without its expensive passes, and XLA's legacy
# loop emitters instead of its MLIR fusion emitters). The tests' tiny models are
# compile-bound: the first two flags make the tiny train step compile about 2x faster
# and run about 1.5x slower; the third then cuts its compile from 25 s to 14-18 s and
# slows its step from 0.28 to 0.39 s (AMD EPYC Zen 3, 2 cores), and took the suite's
# tests from 25-27 to 15-19 minutes. Float semantics do not change (XLA's CPU backend uses no fast-math at any
# level), so no tolerance depends on them; only whether a multiply-add becomes an FMA
# may differ, within each sum's rounding bound. Subprocesses inherit them; a test that
# sets its own XLA_FLAGS keeps these (test_multiprocess.py, which drops the third).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
_flags = os.environ["XLA_FLAGS"].split()
_names = {f.split("=")[0] for f in _flags}
os.environ["XLA_FLAGS"] = " ".join(
    _flags + [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _names]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, in a fresh temporary
# folder (so no run reads another's): several tests build the same step or
# model in new jit objects or in subprocesses (resume, CLIs, multi-process),
# and each of those would otherwise compile it again. Subprocesses inherit it
# through the environment. Only compilations of a second or more are stored.
_OWN_JIT_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_JIT_CACHE = tempfile.mkdtemp(prefix="maskrcnn_jax_test_jit_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_JIT_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_JIT_CACHE:
        shutil.rmtree(_OWN_JIT_CACHE, ignore_errors=True)


def make_tiny_model_config(**overrides) -> ml_collections.ConfigDict:
    """A ResNet-18, width-8 Mask R-CNN that compiles and runs in seconds on CPU."""
    from maskrcnn_jax.modeling import get_model_config

    fields = {
        "depth": 18,
        "backbone_width": 8,
        "fpn_channels": 16,
        "representation_size": 32,
        "mask_head_dim": 16,
        "num_classes": 4,
        "min_size": 64,
        "max_size": 96,
        "rpn_pre_nms_top_n_test": 64,
        "rpn_post_nms_top_n_test": 32,
        "box_candidates": 64,
        "detections_per_img": 8,
        "box_score_thresh": 0.0,
        "roi_align_impl": "reference",
    }
    fields.update(overrides)
    return get_model_config(**fields)


def make_tiny_experiment_config(**train_overrides) -> ml_collections.ConfigDict:
    """``experiments/tiny.py``'s config with ``config.train`` fields replaced."""
    from experiments import tiny

    config = tiny.get_config()
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


@pytest.fixture(scope="session")
def tiny_model_config():
    return make_tiny_model_config


@pytest.fixture(scope="session")
def tiny_model():
    import jax

    from maskrcnn_jax.modeling import init_model

    config = make_tiny_model_config()
    return config, init_model(config, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_experiment_config():
    return make_tiny_experiment_config


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """Where the tiny experiment's shapes dataset is prepared (once per session)."""
    return str(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_train_batch(tiny_data_dir):
    from maskrcnn_jax import data, train

    config = make_tiny_experiment_config()
    config.dataset.data_dir = tiny_data_dir
    with data.make_train_iterator(config.dataset, seed=0, batch_size=8) as it:
        batch = {k: next(it)[k] for k in train.TRAIN_KEYS}
    return config, batch


@pytest.fixture(scope="session")
def tiny_train_state():
    import jax

    from maskrcnn_jax import optim, train

    config = make_tiny_experiment_config()
    k_init, k_train = jax.random.split(jax.random.key(0))
    variables = train.initial_variables(config, k_init, (64, 64))
    optimizer = optim.make_optimizer(config, variables["params"])
    return train.create_train_state(variables, optimizer, k_train), optimizer
