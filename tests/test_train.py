"""Training: sharded step == single device, exact resume after SIGTERM, the input
iterator closed on every exit, overfitting, bad steps, moved settings."""

from __future__ import annotations

import json
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import data, sharding, train
from maskrcnn_jax.modeling import MaskRCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tiny_train_batch, tiny_train_state):
    """(batch, state, run): ``run(state, batch, n)`` is the step jitted on n
    devices, compiled once per n for the whole module.

    It is jitted as the training loop jits it (``train.jit_train_step``), so the
    loop's runs of the tiny config below load the 8-device program from the
    session's compilation cache instead of compiling it again.
    """
    config, batch = tiny_train_batch
    state, optimizer = tiny_train_state
    model = MaskRCNN(config.model)
    compiled = {}

    def run(state, batch, num_devices):
        if num_devices not in compiled:
            mesh = sharding.make_mesh(num_devices)
            fn, state_sharding = train.jit_train_step(model, config, optimizer, mesh, state)
            compiled[num_devices] = mesh, state_sharding, fn
        mesh, state_sharding, fn = compiled[num_devices]
        state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)  # it is donated
        return fn(state, sharding.global_batch(batch, mesh))

    return batch, state, run


def test_eight_devices_equal_one(setup):
    batch, state, run = setup
    assert jax.device_count() == 8
    s8, m8 = run(state, batch, 8)
    s1, m1 = run(state, batch, 1)
    assert bool(m8["finite"]) and float(m8["loss"]) > 0
    for k in (
        "loss",
        "rpn_objectness_loss",
        "rpn_box_loss",
        "classifier_loss",
        "box_loss",
        "mask_loss",
    ):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    chex.assert_trees_all_close(
        jax.device_get(s8.params), jax.device_get(s1.params), rtol=1e-3, atol=1e-5
    )
    # The step really moved the parameters.
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0


def test_non_finite_step_is_skipped_and_counted(setup):
    batch, state, run = setup
    # A NaN in the first backbone kernel makes the loss and every gradient NaN
    # (same shapes and dtypes as above: the compiled step is reused).
    leaves, treedef = jax.tree.flatten(state.params)
    poisoned = state.replace(
        params=jax.tree.unflatten(treedef, [leaves[0].at[0].set(jnp.nan), *leaves[1:]])
    )
    new, metrics = run(poisoned, batch, 1)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(new.bad_steps) == 1 and int(new.skipped_steps) == 1 and int(new.step) == 1
    chex.assert_trees_all_equal(jax.device_get(new.params), jax.device_get(poisoned.params))
    chex.assert_trees_all_equal(jax.device_get(new.opt_state), jax.device_get(poisoned.opt_state))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


class _RecordingIterator:
    """Wraps the real input iterator: counts batches, records ``close()``, and
    sends this process a real SIGTERM after batch ``sigterm_after``."""

    def __init__(self, iterator, sigterm_after=None):
        self.iterator, self.sigterm_after = iterator, sigterm_after
        self.batches, self.closed = 0, False

    def __next__(self):
        batch = next(self.iterator)
        self.batches += 1
        if self.batches == self.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)

    def close(self):
        self.closed = True
        self.iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.fixture
def recorded_iterators(monkeypatch):
    """Every iterator ``train_and_evaluate`` opens; ``.sigterm_after`` applies to the next one."""
    made = []
    real = data.make_train_iterator

    def make(*args, **kwargs):
        made.append(_RecordingIterator(real(*args, **kwargs), make.sigterm_after))
        make.sigterm_after = None
        return made[-1]

    make.sigterm_after = None
    monkeypatch.setattr(data, "make_train_iterator", make)
    return made, make


def test_resume_after_sigterm_reproduces_uninterrupted_run(
    tmp_path, tiny_experiment_config, tiny_data_dir, recorded_iterators
):
    made, make = recorded_iterators
    full = tiny_experiment_config(steps=4)
    full.dataset.data_dir = tiny_data_dir
    train.train_and_evaluate(full, str(tmp_path / "full"))

    # The same 4-step command, preempted by SIGTERM during step 2: it saves
    # step 2 and stops; running it again resumes there.
    make.sigterm_after = 2
    train.train_and_evaluate(full, str(tmp_path / "resumed"))
    assert made[1].batches == 2
    assert ckpt.resolve_checkpoint(str(tmp_path / "resumed")).endswith(os.sep + "2")
    train.train_and_evaluate(full, str(tmp_path / "resumed"))
    assert made[2].batches == 2
    assert [it.closed for it in made] == [True, True, True]

    # Same machine, same compiled step, same inputs (parameters, optimiser
    # state, RNG and input position restored bit for bit): the resumed run
    # repeats the uninterrupted one's arithmetic exactly, so the tight
    # tolerances hold on any CPU.
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [b[s] for s in (1, 2, 3, 4)], [a[s] for s in (1, 2, 3, 4)], rtol=1e-6
    )
    va, _ = ckpt.load_model(str(tmp_path / "full"))
    vb, config_b = ckpt.load_model(str(tmp_path / "resumed"))
    chex.assert_trees_all_close(va, vb, rtol=1e-6, atol=1e-7)
    assert config_b.class_names == ["__background__", "circle", "square", "triangle"]


def test_input_iterator_closed_when_training_fails(
    tmp_path, monkeypatch, tiny_experiment_config, tiny_data_dir, recorded_iterators
):
    made, _ = recorded_iterators

    def fail(*args, **kwargs):
        raise RuntimeError("initialisation failed")

    monkeypatch.setattr(train, "initial_variables", fail)
    config = tiny_experiment_config()
    config.dataset.data_dir = tiny_data_dir
    with pytest.raises(RuntimeError, match="initialisation failed"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert len(made) == 1 and made[0].closed and made[0].batches == 0


def test_two_aspect_canvases_compile_the_step_exactly_twice(
    tmp_path, monkeypatch, tiny_experiment_config
):
    """Landscape and portrait batches (64x96, 96x64): one trace and compile each, no other.

    The step the loop compiles traces the real train step abstractly
    (``jax.eval_shape``: the model, its anchors and losses at the batch's
    canvas) but computes only the state's step counter, so that XLA compiles
    two trivial programs instead of two train steps (a minute each on a
    loaded 2-core machine). A compilation happens only after a trace, so the
    traces count them.
    """
    from tests.test_input_pipeline import aspect_dataset_config, write_mixed_orientation_coco

    ann, imgs = write_mixed_orientation_coco(str(tmp_path))
    config = tiny_experiment_config(steps=6, batch_size=2, reference_batch_size=2, num_devices=1)
    config.dataset = aspect_dataset_config(str(tmp_path), ann, imgs, drop_empty_images=True)
    config.checkpoint_every = 6
    traced, real_losses = [], []
    real_make_train_step = train.make_train_step

    def counting_make_train_step(*args, **kwargs):
        real_step = real_make_train_step(*args, **kwargs)

        def step(state, batch):  # Runs once per trace.
            traced.append(tuple(batch["image"].shape))
            spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, batch))
            _, metrics = jax.eval_shape(real_step, *spec)
            real_losses.append(metrics["loss"])
            metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
            return state.replace(step=state.step + 1), metrics

        return step

    monkeypatch.setattr(train, "make_train_step", counting_make_train_step)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert sorted(traced) == [(2, 64, 96, 3), (2, 96, 64, 3)]
    assert [(m.shape, m.dtype) for m in real_losses] == [((), jnp.float32)] * 2
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]  # Both canvases, 6 steps.


@pytest.mark.parametrize("steps, stopped_at", [(20, 4), (3, 3)])
def test_consecutive_non_finite_steps_stop_the_run_with_a_checkpoint(
    tmp_path, monkeypatch, tiny_experiment_config, tiny_data_dir, recorded_iterators,
    steps, stopped_at,
):  # fmt: skip
    """``train.max_bad_steps`` non-finite steps in a row: a one-line TrainingError, a checkpoint.

    The loop reads each step's count after queueing the next, so it stops one step after
    the limit, or after the last step (already saved) when that is the limit's. The step
    is a stand-in that only counts (no model compile); the real step's skipping is
    test_non_finite_step_is_skipped_and_counted's.
    """
    made, _ = recorded_iterators
    config = tiny_experiment_config(steps=steps, max_bad_steps=3)
    config.dataset.data_dir = tiny_data_dir
    config.checkpoint_every = 100

    def nan_make_train_step(*args, **kwargs):
        def step(state, batch):
            nan = jnp.float32(jnp.nan) + 0 * jnp.sum(batch["image"][0, 0, 0])
            bad = state.bad_steps + 1
            new = state.replace(step=state.step + 1, bad_steps=bad,
                                skipped_steps=state.skipped_steps + 1)  # fmt: skip
            return new, {"loss": nan, "lr": jnp.float32(0.01), "finite": nan > 0,
                         "grad_norm": nan, "bad_steps": bad}  # fmt: skip

        return step

    monkeypatch.setattr(train, "make_train_step", nan_make_train_step)
    with pytest.raises(train.TrainingError) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3 consecutive steps had a non-finite loss or gradient (last at "
                              "step 3); stopping.")  # fmt: skip
    assert ckpt.resolve_checkpoint(str(tmp_path / "run")).endswith(os.sep + str(stopped_at))
    assert sorted(_losses(tmp_path / "run")) == list(range(1, stopped_at + 1))
    assert made[0].closed


@pytest.mark.parametrize("name", train.MOVED_TO_MODEL)
def test_old_train_spellings_of_model_settings_fail(tmp_path, tiny_experiment_config, name):
    config = tiny_experiment_config()
    config.train[name] = 1  # an unlocked config accepts new fields: train_and_evaluate refuses
    with pytest.raises(ValueError, match=rf"^config\.train\.{name} is now config\.model\.{name}$"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_cli_refuses_old_train_spelling(tmp_path, capsys):
    argv = [
        "train",
        "--config",
        os.path.join(ROOT, "experiments", "tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.train.mask_rois_per_image=32",
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "mask_rois_per_image" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_overfits_a_handful_of_images(tmp_path, tiny_experiment_config):
    """A tiny model memorises 8 shapes images: losses collapse, masks match."""
    from maskrcnn_jax.inference import Predictor

    # One device: this test is about learning, and test_eight_devices_equal_one covers
    # the sharding. Eight simulated devices on two cores compile a longer program and run
    # each step slower (40 tiny steps: 99 s against 62 s in all).
    config = tiny_experiment_config(
        steps=200, base_lr=0.02, warmup_steps=10, decay_steps=(170,), clip_norm=10.0,
        num_devices=1,
    )
    config.dataset.shapes.num_train = 8
    config.dataset.flip = False
    config.dataset.data_dir = str(tmp_path / "data")
    config.log_every = 10
    config.checkpoint_every = 1000
    train.train_and_evaluate(config, str(tmp_path / "run"))
    losses = _losses(tmp_path / "run")
    first, last = losses[10], losses[200]
    assert last < first / 4, (first, last)

    # Compare predicted masks with the full-resolution ground truth of the
    # same 8 images, exported in COCO format.
    from pycocotools import mask as mask_utils

    from maskrcnn_jax.image_io import load_image

    s = config.dataset.shapes
    ann_path, images_dir = data.write_shapes_coco(
        str(tmp_path / "coco"), "train", 8, s.image_size, s.seed,
        min_shapes=s.min_shapes, max_shapes=s.max_shapes, min_size=s.min_size, max_size=s.max_size,
    )  # fmt: skip
    with open(ann_path) as f:
        coco = json.load(f)
    predictor = Predictor.from_checkpoint(str(tmp_path / "run"))
    ious = []
    for image in coco["images"]:
        pred = predictor([load_image(os.path.join(images_dir, image["file_name"]))])[0]
        pred_masks = np.asarray(pred["masks"]) > 0.5
        labels = np.asarray(pred["labels"])
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            gt = mask_utils.decode(ann["segmentation"]).astype(bool)
            label = _label_of(predictor, ann["category_id"])
            same = pred_masks[labels == label]
            inter = (same & gt).sum((1, 2))
            union = (same | gt).sum((1, 2))
            ious.append(float((inter / np.maximum(union, 1)).max()) if len(same) else 0.0)
    assert len(ious) >= 8 and np.mean(ious) > 0.7, ious


def _label_of(predictor, category_id):
    """Contiguous label of a dataset category id, from the checkpoint's config."""
    return list(predictor.config.category_ids).index(category_id)


@pytest.mark.parametrize("recommended", [False, True])
def test_log_devices_warns_once_for_an_accelerator_config_on_cpu(
    caplog, tiny_experiment_config, recommended
):
    config = tiny_experiment_config()
    config.accelerator_recommended = recommended
    with caplog.at_level("INFO", logger=train.log.name):
        train.log_devices(config)
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    n = len(jax.devices())
    assert infos == [f"JAX backend cpu: {n} x {jax.devices()[0].device_kind}, 1 process(es)"]
    if recommended:
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert "only a CPU" in warnings[0] and "ACCEL=cuda13" in warnings[0]
    else:
        assert warnings == []


def test_only_the_coco_config_asks_for_an_accelerator():
    from experiments import coco_r50_fpn_1x, shapes, tiny

    assert coco_r50_fpn_1x.get_config().accelerator_recommended is True
    assert not shapes.get_config().accelerator_recommended
    assert not tiny.get_config().accelerator_recommended
