"""The optimiser: learning-rate schedule, masks, and building it from abstract params."""

from __future__ import annotations

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import coco_r50_fpn_1x

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
        base_lr=0.02, batch_size=8, reference_batch_size=16, steps=50, warmup_steps=5,
        warmup_factor=0.001, decay_steps=(10, 15),
    )  # fmt: skip
    lr = optim.learning_rate_schedule(config.train)
    # Half the reference batch: half the rate, twice the steps (10 warm-up, decays at 20, 30).
    assert optim.effective_schedule(config.train).steps == 100
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


def _old_rule(base_lr, batch, reference, warmup, factor, decays, decay_factor, steps):
    """The schedule as computed before steps scaled with the batch, in float64."""
    step = np.arange(steps, dtype=np.float64)
    warm = np.where(step < warmup, factor * (1 - step / warmup) + step / warmup, 1.0)
    decay = decay_factor ** (step[:, None] >= np.asarray(decays)[None]).sum(1)
    return base_lr * batch / reference * warm * decay


@pytest.mark.parametrize(
    "name, old",
    [
        # The values experiments/shapes.py and tiny.py had (reference batch 16).
        ("shapes", dict(base_lr=0.04, batch=8, reference=16, warmup=100, factor=0.001,
                        decays=(380, 470), decay_factor=0.1, steps=500)),
        ("tiny", dict(base_lr=0.02, batch=8, reference=16, warmup=2, factor=0.001,
                      decays=(1000,), decay_factor=0.1, steps=4)),
    ],
)  # fmt: skip
def test_shapes_and_tiny_schedules_unchanged(name, old):
    train = importlib.import_module(f"experiments.{name}").get_config().train
    spec = optim.effective_schedule(train)
    assert spec.steps == old["steps"] and spec.batch_size == old["batch"]
    assert spec.lr == old["base_lr"] * old["batch"] / old["reference"]  # exact: powers of two
    lr = optim.learning_rate_schedule(train)
    ours = np.array([lr(s) for s in range(spec.steps)])
    # float32 schedule against a float64 formula: a few roundings of 2^-24 each.
    np.testing.assert_allclose(ours, _old_rule(**old), rtol=1e-6)


@pytest.mark.parametrize("batch", [8, 32])
def test_batch_change_keeps_images_and_schedule_in_images(batch):
    """COCO 1x at batch 8 or 32: the images of batch 16; warm-up and decays at the same images."""
    train = coco_r50_fpn_1x.get_config().train
    ref = optim.effective_schedule(train)
    train.batch_size = batch
    spec = optim.effective_schedule(train)
    assert ref.steps * 16 == spec.steps * batch == 90_000 * 16
    assert ref.warmup_steps * 16 == spec.warmup_steps * batch
    assert [s * batch for s in spec.decay_steps] == [s * 16 for s in ref.decay_steps]
    assert spec.lr == pytest.approx(0.02 * batch / 16, rel=1e-15)
    # The rate at the same image count, relative to the batch's base rate, is the same.
    lr16 = optim.learning_rate_schedule(coco_r50_fpn_1x.get_config().train)
    lr = optim.learning_rate_schedule(train)
    for images in (0, 8_000, 16_000, 959_968, 960_000, 1_280_000, 1_439_968):
        np.testing.assert_allclose(
            lr(images // batch) / spec.lr, lr16(images // 16) / ref.lr, rtol=1e-6, err_msg=images
        )
    assert spec.describe().startswith(f"schedule: {90_000 * 16 // batch} steps at batch {batch} ")


def test_schedule_description_states_epochs_lr_and_decays():
    train = coco_r50_fpn_1x.get_config().train
    train.batch_size = 8
    text = optim.effective_schedule(train).describe(num_images=117_266)
    assert text == (
        "schedule: 180000 steps at batch 8 (reference schedule x2; 1440000 images = 12.28 "
        "epochs of 117266), lr 0.01 after 2000 warm-up steps, decays at steps 120000, 160000"
    )
