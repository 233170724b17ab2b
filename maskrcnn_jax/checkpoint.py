"""Orbax checkpoints that carry their own model config.

Every checkpoint is an orbax ``CheckpointManager`` directory of numbered steps;
each step holds the items

- ``model``: the variables (``{"params": ..., "constants": ...}``),
- ``model_config``: the model's ``ConfigDict`` as JSON, so that nothing else is
  needed to rebuild the network,
- and, for checkpoints written by training, ``train_state`` (optimiser state,
  step, RNG, counters) and ``data_state`` (the input iterator position).

A path given by a user may be a step directory, a manager directory (its
latest step is used) or a training work dir (its ``checkpoints/``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
    """A path that does not hold a usable checkpoint."""


def _is_step_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "model")) and os.path.isdir(
        os.path.join(path, "model_config")
    )


def _latest_step_dir(manager_dir: str) -> str | None:
    steps = [int(d) for d in os.listdir(manager_dir) if d.isdigit() and _is_step_dir(os.path.join(manager_dir, d))]
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


def config_from_dict(d: dict[str, Any]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d)


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
                model=ocp.args.StandardRestore(), model_config=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:  # orbax raises many kinds; name the path once
        raise CheckpointError(f"{step_dir}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    variables = jax.tree.map(jax.numpy.asarray, restored["model"])
    return variables, config_from_dict(restored["model_config"])
