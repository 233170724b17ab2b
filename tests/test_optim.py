"""The optimiser: learning-rate schedule, masks, and building it from abstract params."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import optim


def _params():
    return {
        "backbone": {
            "conv1": {"kernel": jnp.ones((3, 3, 3, 8))},
            "layer1_0": {"conv1": {"kernel": jnp.ones((3, 3, 8, 8))}},
            "layer2_0": {"conv1": {"kernel": jnp.ones((3, 3, 8, 8)), "bias": jnp.ones(8)}},
        },
        "head": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
    }


def test_learning_rate_schedule(tiny_experiment_config):
    config = tiny_experiment_config(
        base_lr=0.02, batch_size=8, warmup_steps=10, warmup_factor=0.001, decay_steps=(20, 30)
    )
    lr = optim.learning_rate_schedule(config.train)
    base = 0.02 * 8 / 16
    # The schedule runs in float32: the constants' roundings and about five
    # operations, each within 2^-24 relative, stay below 8 * 2^-24 = 4.8e-7.
    np.testing.assert_allclose(lr(0), base * 0.001, rtol=1e-6)
    np.testing.assert_allclose(lr(5), base * (0.001 * 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(
        [lr(10), lr(19), lr(20), lr(30)], [base, base, base * 0.1, base * 0.01], rtol=1e-6
    )


def test_frozen_and_decay_masks():
    params = _params()
    frozen = optim.frozen_mask(params, freeze_at=2)
    assert (
        frozen["backbone"]["conv1"]["kernel"] and frozen["backbone"]["layer1_0"]["conv1"]["kernel"]
    )
    assert not frozen["backbone"]["layer2_0"]["conv1"]["kernel"] and not frozen["head"]["kernel"]
    assert not any(jax.tree.leaves(optim.frozen_mask(params, freeze_at=0)))
    decay = optim.decay_mask(params, decay_norm_and_bias=False)
    assert decay["backbone"]["layer2_0"]["conv1"]["kernel"]
    assert not decay["backbone"]["layer2_0"]["conv1"]["bias"]
    assert all(jax.tree.leaves(optim.decay_mask(params, decay_norm_and_bias=True)))


def test_optimizer_from_abstract_params_equals_one_from_arrays(tiny_experiment_config):
    config = tiny_experiment_config(clip_norm=1.0, weight_decay=0.1)
    config.model.freeze_at = 2
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    from_arrays = optim.make_optimizer(config, params)
    from_shapes = optim.make_optimizer(config, jax.eval_shape(lambda: params))

    def two_steps(opt):
        state = opt.init(params)
        for _ in range(2):
            updates, state = opt.update(grads, state, params)
        return updates

    # Identical transformations on identical inputs: the same float32 ops.
    ours, ref = two_steps(from_shapes), two_steps(from_arrays)
    chex.assert_trees_all_equal(ours, ref)
    assert float(jnp.abs(ours["backbone"]["conv1"]["kernel"]).max()) == 0  # frozen stage
    assert float(jnp.abs(ours["backbone"]["layer2_0"]["conv1"]["kernel"]).min()) > 0
