"""Checkpoints: model save / load, path resolution, one-line errors, the train
state's round trip with its sharding, fine-tuning merges."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import sharding


def test_save_and_load_model_round_trip(tmp_path, tiny_model):
    config, variables = tiny_model
    assert "constants" in variables  # frozen batch norm: both collections travel
    step_dir = ckpt.save_model(str(tmp_path / "ckpt"), variables, config, step=3)
    assert step_dir == str(tmp_path / "ckpt" / "3")
    loaded, loaded_config = ckpt.load_model(step_dir)
    chex.assert_trees_all_equal(loaded, variables)  # bytes written and read back
    assert loaded_config.to_dict() == config.to_dict()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A work dir whose ``checkpoints/`` holds steps 2 and 5 of a small model."""
    root = tmp_path_factory.mktemp("run")
    config = ckpt.config_from_dict({"num_classes": 2})
    for step in (2, 5):
        variables = {"params": {"w": jnp.full((3,), float(step))}}
        ckpt.save_model(str(root / ckpt.CHECKPOINT_SUBDIR), variables, config, step=step)
    return root


def test_resolve_checkpoint_accepts_step_manager_and_work_dirs(workdir):
    manager_dir = workdir / ckpt.CHECKPOINT_SUBDIR
    assert ckpt.resolve_checkpoint(str(manager_dir / "2")) == str(manager_dir / "2")
    assert ckpt.resolve_checkpoint(str(manager_dir)) == str(manager_dir / "5")
    assert ckpt.resolve_checkpoint(str(workdir)) == str(manager_dir / "5")
    variables, config = ckpt.load_model(str(workdir))
    np.testing.assert_array_equal(variables["params"]["w"], [5.0, 5.0, 5.0])
    assert config.num_classes == 2


def test_resolve_checkpoint_errors_name_the_path_on_one_line(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint directory") as e:
        ckpt.resolve_checkpoint(str(missing))
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    other = tmp_path / "other"
    (other / "7").mkdir(parents=True)  # a step-like name without the items
    (other / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint") as e:
        ckpt.resolve_checkpoint(str(other))
    assert str(other) in str(e.value) and "\n" not in str(e.value)


def test_load_model_of_a_non_checkpoint_is_one_line(tmp_path):
    fake = tmp_path / "fake" / "4"
    (fake / "model").mkdir(parents=True)  # looks like a step directory, holds nothing
    (fake / "model_config").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint") as e:
        ckpt.load_model(str(tmp_path / "fake"))
    assert str(fake) in str(e.value) and "\n" not in str(e.value)


def test_train_state_round_trip_with_sharding(tmp_path, tiny_train_state, tiny_experiment_config):
    state, _ = tiny_train_state
    model_config = tiny_experiment_config().model
    # Values that cannot come back by accident: counters, momentum and params moved.
    leaves, treedef = jax.tree.flatten(state.opt_state)
    opt_state = jax.tree.unflatten(treedef, [x + 0.25 * (i + 1) for i, x in enumerate(leaves)])
    state = state.replace(
        step=jnp.int32(7),
        params=jax.tree.map(lambda p: p - 0.5, state.params),
        opt_state=opt_state,
        rng=jax.random.fold_in(state.rng, 11),
        bad_steps=jnp.int32(2),
        skipped_steps=jnp.int32(3),
    )
    mesh = sharding.make_mesh(2)
    abstract = jax.eval_shape(lambda s: s, state)
    state_sharding = sharding.tree_replicated(abstract, mesh)
    data_state = b'{"next_index": 17}'
    manager = ckpt.make_manager(str(tmp_path / "ckpt"), item_names=ckpt.TRAIN_ITEMS)
    ckpt.save_train_state(manager, 7, state, model_config, data_state)
    manager.wait_until_finished()

    restored, restored_data = ckpt.restore_train_state(manager, 7, abstract, state_sharding)
    manager.close()
    assert restored_data == data_state
    chex.assert_trees_all_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    chex.assert_trees_all_equal(
        restored.replace(rng=None, constants=None), state.replace(rng=None, constants=None)
    )
    assert restored.constants == {}  # the tiny experiment uses group norm
    for leaf, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state_sharding.params)):
        assert leaf.sharding == want
    # The same step is an ordinary model checkpoint too.
    variables, config = ckpt.load_model(str(tmp_path / "ckpt"))
    chex.assert_trees_all_equal(variables, state.variables())
    assert config.to_dict() == model_config.to_dict()


def test_merge_pretrained_takes_matching_paths_and_shapes():
    fresh = {"params": {"a": jnp.zeros(3), "b": jnp.zeros((2, 2)), "c": jnp.zeros(1)}}
    loaded = {"params": {"a": np.arange(3.0), "b": np.ones((4, 2)), "d": np.ones(1)}}
    merged = ckpt.merge_pretrained(fresh, loaded, "test")
    np.testing.assert_array_equal(merged["params"]["a"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(merged["params"]["b"], np.zeros((2, 2)))  # shape differs
    np.testing.assert_array_equal(merged["params"]["c"], [0.0])  # not in the loaded tree
    assert merged["params"]["a"].dtype == jnp.float32
