"""Orbax checkpoints that carry their own model config.

Every checkpoint is an orbax ``CheckpointManager`` directory of numbered steps;
each step holds the items

- ``model``: the variables (``{"params": ..., "constants": ...}``),
- ``model_config``: the model's ``ConfigDict`` as JSON, so that nothing else is
  needed to rebuild the network,
- and, for checkpoints written by training, ``train_state`` (optimiser state,
  step, RNG, counters) and ``data_state``: the input iterator position of
  *each* process, one file per process (``process_{i}-of-{n}.json``, grain's
  orbax handler), since every process reads its own rows of the batch.

In a multi-process run every process calls save and restore (orbax's
multi-host path: arrays are written once, by the processes that hold them,
into one shared directory); the step directory must be on storage all
processes see.

A path given by a user may be a step directory, a manager directory (its
latest step is used) or a training work dir (its ``checkpoints/``).

Training writes and reads its state with :func:`save_train_state` and
:func:`restore_train_state`; one function, :func:`_train_state_items`, lays
the state out into items for both.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
# The items of a checkpoint written by training (make_manager(item_names=...)).
TRAIN_ITEMS = ("model", "model_config", "train_state", "data_state")


class CheckpointError(ValueError):
    """A path that does not hold a usable checkpoint."""


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "model")) and os.path.isdir(
        os.path.join(path, "model_config")
    )


def _latest_step_dir(manager_dir: str) -> str | None:
    steps = [
        int(d)
        for d in os.listdir(manager_dir)
        if d.isdigit() and _is_step_dir(os.path.join(manager_dir, d))
    ]
    return os.path.join(manager_dir, str(max(steps))) if steps else None


def resolve_checkpoint(path: str) -> str:
    """Returns the step directory that ``path`` designates.

    Raises:
      CheckpointError: naming ``path`` when it holds no checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if _is_step_dir(path):
        return path
    for candidate in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if os.path.isdir(candidate):
            step_dir = _latest_step_dir(candidate)
            if step_dir:
                return step_dir
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a step directory with 'model' and "
        f"'model_config', a checkpoint directory of steps, or a work dir with '{CHECKPOINT_SUBDIR}/')"
    )


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


# Model config fields added after checkpoints were first written, with the value that
# gives the behaviour those checkpoints were trained and converted with.
ADDED_MODEL_FIELDS = {"roi_pooler": "align", "mask_loss": "sigmoid", "class_agnostic_mask": False}


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    """The model config of a checkpoint; fields it predates get :data:`ADDED_MODEL_FIELDS`."""
    return ml_collections.ConfigDict({**ADDED_MODEL_FIELDS, **d})


def make_manager(
    directory: str,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    item_names: tuple[str, ...] = ("model", "model_config"),
) -> ocp.CheckpointManager:
    """A CheckpointManager over ``directory`` (atomic saves, keeps ``max_to_keep``)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=item_names)


def save_model(
    directory: str, variables: Any, model_config: ml_collections.ConfigDict, step: int = 0
) -> str:
    """Writes ``variables`` and their config as step ``step`` of ``directory``.

    Returns:
      The step directory written.
    """
    manager = make_manager(directory, max_to_keep=None)
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(variables),
            model_config=ocp.args.JsonSave(config_to_dict(model_config)),
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return os.path.join(os.path.abspath(directory), str(step))


def load_model(path: str) -> tuple[Any, ml_collections.ConfigDict]:
    """Loads (variables, model_config) from a checkpoint or training work dir.

    Arrays come back as host-local jax arrays on the default device.
    """
    step_dir = resolve_checkpoint(path)
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        restored = checkpointer.restore(
            step_dir,
            args=ocp.args.Composite(
                # A checkpoint of a multi-process run names devices of other processes:
                # those arrays come to this process's first device instead.
                model=ocp.args.StandardRestore(
                    fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                ),
                model_config=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:  # orbax raises many kinds; name the path once
        raise CheckpointError(
            f"{step_dir}: cannot read checkpoint ({type(e).__name__}: {e})"
        ) from e
    variables = jax.tree.map(jax.numpy.asarray, restored["model"])
    return variables, config_from_dict(restored["model_config"])


def merge_pretrained(fresh: Any, loaded: Any, what: str) -> Any:
    """Takes every loaded array whose path and shape match; keeps the rest fresh.

    Used to fine-tune with another class count: the class-specific layers
    (class logits, box deltas, mask predictor) do not match and stay freshly
    initialised (as Detectron2's checkpointer skips mismatched shapes).

    Args:
      fresh: variables to fill (``init_model``'s output).
      loaded: variables of a checkpoint or a converted backbone; may hold a
        subset of ``fresh``'s paths.
      what: where ``loaded`` came from, for the log line.

    Returns:
      ``fresh``'s tree, with each loaded array cast to the fresh dtype.
    """
    keystr = jax.tree_util.keystr
    flat_loaded = {keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    kept, reinit = 0, []

    def pick(path, x):
        nonlocal kept
        v = flat_loaded.get(keystr(path))
        if v is not None and tuple(v.shape) == tuple(x.shape):
            kept += 1
            return jax.numpy.asarray(v, x.dtype)
        reinit.append(keystr(path))
        return x

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    log.info("%s: loaded %d arrays, %d freshly initialised", what, kept, len(reinit))
    return merged


# ---------------------------------------------------------------- training state


def _train_state_items(state: Any, key_data: Any = jax.random.key_data) -> dict[str, Any]:
    """The ``model`` and ``train_state`` items of a train state: the one layout.

    Args:
      state: a :class:`maskrcnn_jax.train.TrainState` (of arrays, of
        ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``, or of shardings).
      key_data: maps ``state.rng`` to what is stored: its raw key data for
        arrays; the identity for a tree of shardings.
    """
    return {
        "model": state.variables(),
        "train_state": {
            "step": state.step,
            "opt_state": state.opt_state,
            "rng": key_data(state.rng),
            "bad_steps": state.bad_steps,
            "skipped_steps": state.skipped_steps,
        },
    }


def save_train_state(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    model_config: ml_collections.ConfigDict,
    data_state: bytes,
) -> None:
    """Saves ``state`` as step ``step`` of a manager made with ``TRAIN_ITEMS``.

    The save is asynchronous: call ``manager.wait_until_finished()`` before
    exiting.

    Args:
      state: a :class:`maskrcnn_jax.train.TrainState`.
      model_config: the model config recorded with the variables (with the
        dataset's ``class_names`` / ``category_ids``), so that the checkpoint
        is usable by ``Predictor.from_checkpoint``.
      data_state: this process's input iterator ``get_state()``; each process
        writes its own file.
    """
    items = _train_state_items(state)
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(items["model"]),
            model_config=ocp.args.JsonSave(config_to_dict(model_config)),
            train_state=ocp.args.StandardSave(items["train_state"]),
            data_state=grain.PyGrainCheckpointSave(_IteratorState(data_state)),
        ),
        force=True,
    )


def restore_train_state(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, state_sharding: Any
) -> tuple[Any, bytes]:
    """Restores a train state saved by :func:`save_train_state`, with its sharding.

    Args:
      abstract_state: the state's ``jax.eval_shape`` (a ``TrainState`` of
        ``jax.ShapeDtypeStruct``).
      state_sharding: a ``TrainState`` of shardings, one per leaf.

    Returns:
      (the state, this process's input iterator state for its ``set_state``).

    Raises:
      CheckpointError: the step holds no iterator state for this process (it
        was written with another process count).
    """
    abstract = jax.eval_shape(_train_state_items, abstract_state)
    shardings = _train_state_items(state_sharding, key_data=lambda s: s)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    i, n = jax.process_index(), jax.process_count()
    own = os.path.join(str(manager.directory), str(step), "data_state", f"process_{i}-of-{n}.json")
    if not os.path.exists(own):
        raise CheckpointError(
            f"{own}: no input iterator state for process {i} of {n} (the checkpoint was "
            "written by another number of processes)"
        )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(target["model"]),
            train_state=ocp.args.StandardRestore(target["train_state"]),
            data_state=grain.PyGrainCheckpointRestore(_IteratorState()),
        ),
    )
    t, v = restored["train_state"], restored["model"]
    state = abstract_state.replace(
        step=t["step"],
        params=v["params"],
        constants=v.get("constants", {}),
        opt_state=t["opt_state"],
        rng=jax.random.wrap_key_data(t["rng"]),
        bad_steps=t["bad_steps"],
        skipped_steps=t["skipped_steps"],
    )
    return state, restored["data_state"].state


class _IteratorState:
    """An iterator state (bytes) in the shape grain's orbax handler saves and restores."""

    def __init__(self, state: bytes = b""):
        self.state = state

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:  # called by the handler after set_state
        pass
