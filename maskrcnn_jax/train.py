"""Training: TrainState, the sharded train step, and the training loop.

Run::

    python -m maskrcnn_jax.train --config experiments/shapes.py --workdir runs/shapes
    python -m maskrcnn_jax.train --config experiments/coco_r50_fpn_1x.py --workdir runs/coco \
        --config.dataset.train_annotations=... --config.train.steps=1000

Running the same command again resumes from the latest checkpoint in
``WORKDIR/checkpoints`` (step, parameters, optimiser state, RNG and the input
iterator position), so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import losses, sharding, targets
from maskrcnn_jax.modeling import MaskRCNN, init_model
from maskrcnn_jax.modeling.mask_rcnn import anchors_for
from maskrcnn_jax.modeling.rpn import propose

# Keys of the input batch that the train step reads (the others stay on the host).
TRAIN_KEYS = ("image", "image_size", "boxes", "labels", "masks", "is_crowd", "valid")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes; saved whole in checkpoints.

    Attributes:
      step: number of steps taken (applied or skipped).
      params: trainable variables.
      constants: non-trained variables (frozen batch norm), may be empty.
      opt_state: optax state.
      rng: PRNG key; step ``t`` uses ``fold_in(rng, t)``.
      bad_steps: consecutive steps skipped for non-finite loss or gradients.
      skipped_steps: all steps skipped so far.
    """

    step: jax.Array
    params: Any
    constants: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array
    skipped_steps: jax.Array

    def variables(self) -> dict[str, Any]:
        return {"params": self.params, **({"constants": self.constants} if self.constants else {})}


# ---------------------------------------------------------------- optimiser


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up, then step decay (Detectron2's WarmupMultiStepLR).

    The base rate scales linearly with the global batch:
    ``lr = base_lr * batch_size / reference_batch_size``.
    """
    lr = train.base_lr * train.batch_size / train.reference_batch_size
    warmup, factor = int(train.warmup_steps), float(train.warmup_factor)
    boundaries = {int(s): float(train.decay_factor) for s in train.decay_steps}
    decay = optax.piecewise_constant_schedule(lr, boundaries)

    def schedule(step):
        alpha = jnp.clip(step / max(warmup, 1), 0.0, 1.0)
        warm = factor * (1 - alpha) + alpha
        return decay(step) * jnp.where(step < warmup, warm, 1.0)

    return schedule


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_mask(params: Any, freeze_at: int) -> Any:
    """True for backbone parameters of stages frozen by ``freeze_at``.

    Stage 1 is the stem (``conv1``), stage k >= 2 is ``layer{k-1}_*``. Their
    gradients are already zero (``stop_gradient``); the mask keeps weight
    decay and momentum from moving them.
    """

    def frozen(path, _):
        names = _path_names(path)
        if "backbone" not in names:
            return False
        child = names[names.index("backbone") + 1]
        if child == "conv1":
            return freeze_at >= 1
        if child.startswith("layer"):
            return freeze_at >= int(child[5:].split("_")[0]) + 1
        return False

    return jax.tree_util.tree_map_with_path(frozen, params)


def decay_mask(params: Any, decay_norm_and_bias: bool) -> Any:
    """Weight decay on kernels; on biases and norm scales only if asked."""
    return jax.tree.map(lambda p: bool(decay_norm_and_bias) or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """SGD with momentum, masked weight decay, optional clipping; frozen params fixed."""
    train = config.train
    chain = []
    if train.clip_norm:
        chain.append(optax.clip_by_global_norm(train.clip_norm))
    chain += [
        optax.add_decayed_weights(train.weight_decay, mask=decay_mask(params, train.decay_norm_and_bias)),
        optax.sgd(learning_rate_schedule(train), momentum=train.momentum),
    ]
    opt = optax.chain(*chain)
    frozen = frozen_mask(params, config.model.freeze_at)
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------- the step


def compute_losses(
    model: MaskRCNN,
    variables: dict[str, Any],
    batch: dict[str, jax.Array],
    key: jax.Array,
    config: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """The five loss terms of one global batch.

    Args:
      batch: ``image [B,H,W,3]`` uint8 or float 0..255, ``image_size [B,2]``,
        ``boxes [B,M,4]``, ``labels [B,M]``, ``masks [B,M,S,S]`` (box-cropped),
        ``is_crowd [B,M]``, ``valid [B,M]``.
      key: PRNG key for the anchor and RoI sampling.
    """
    mc, tc = config.model, config.train
    images = batch["image"].astype(jnp.float32)
    b, h, w = images.shape[:3]
    image_sizes = batch["image_size"]
    gt_boxes = batch["boxes"].astype(jnp.float32)
    gt_valid, gt_crowd, gt_labels = batch["valid"], batch["is_crowd"], batch["labels"]

    feats = model.apply(variables, images, image_sizes, method=MaskRCNN.features)
    objectness, deltas = model.apply(variables, feats, method=MaskRCNN.rpn)
    anchors, level_sizes = anchors_for(mc, (h, w))
    k_rpn, k_roi = jax.random.split(key)
    rpn_t = jax.vmap(
        lambda g, v, c, k: targets.rpn_targets(
            anchors, g, v, c, k, tc.rpn_batch_size_per_image, tc.rpn_positive_fraction
        )
    )(gt_boxes, gt_valid, gt_crowd, jax.random.split(k_rpn, b))
    rpn_obj, rpn_box = losses.rpn_loss(
        objectness, deltas, rpn_t.positive, rpn_t.negative, rpn_t.deltas, tc.smooth_l1_beta
    )

    proposals, _, proposal_valid = propose(
        jax.lax.stop_gradient(objectness),
        jax.lax.stop_gradient(deltas),
        anchors,
        image_sizes,
        level_sizes,
        mc.rpn_pre_nms_top_n_train,
        mc.rpn_post_nms_top_n_train,
        mc.rpn_nms_thresh,
        mc.rpn_min_size,
    )
    roi_t = jax.vmap(
        lambda p, pv, g, l, v, c, k: targets.roi_targets(
            p, pv, g, l, v, c, k, tc.roi_batch_size_per_image, tc.roi_positive_fraction
        )
    )(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, gt_crowd, jax.random.split(k_roi, b))
    class_logits, box_deltas = model.apply(variables, feats, roi_t.rois, method=MaskRCNN.box_head)
    cls, box = losses.box_head_loss(
        class_logits, box_deltas, roi_t.labels, roi_t.deltas, roi_t.valid, tc.smooth_l1_beta
    )

    # Positives come first in the RoI slots, in random order: the mask head
    # runs on a prefix that holds every positive (or, with a smaller
    # train.mask_rois_per_image, a uniform random subset of them).
    p = int(tc.roi_batch_size_per_image * tc.roi_positive_fraction)
    p = min(p, int(tc.get("mask_rois_per_image") or p))
    mask_rois = roi_t.rois[:, :p]
    mask_logits = model.apply(variables, feats, mask_rois, method=MaskRCNN.mask_head)
    m = mask_logits.shape[2]
    mask_t = jax.vmap(lambda gm, gb, r, i: targets.mask_targets(gm, gb, r, i, m))(
        batch["masks"], gt_boxes, mask_rois, roi_t.matched[:, :p]
    )
    mask = losses.mask_loss(mask_logits, roi_t.labels[:, :p], mask_t, roi_t.positive[:, :p])
    return {
        "rpn_objectness_loss": rpn_obj,
        "rpn_box_loss": rpn_box,
        "classifier_loss": cls,
        "box_loss": box,
        "mask_loss": mask,
    }


def make_train_step(
    model: MaskRCNN, config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step: (state, batch) -> (state, metrics).

    A step whose loss or gradients are not finite is not applied: parameters
    and optimiser state stay as they were, ``bad_steps`` and
    ``skipped_steps`` count it.
    """
    schedule = learning_rate_schedule(config.train)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            variables = state.replace(params=params).variables()
            terms = compute_losses(model, variables, batch, key, config)
            return losses.total_loss(terms), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        )
        metrics = dict(terms, loss=loss, lr=schedule(state.step), finite=finite,
                       grad_norm=optax.global_norm(grads))
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------- set-up


def _merge_pretrained(fresh: Any, loaded: Any, what: str) -> Any:
    """Takes every loaded array whose path and shape match; keeps the rest fresh.

    Used to fine-tune with another class count: the class-specific layers
    (class logits, box deltas, mask predictor) do not match and stay freshly
    initialised.
    """
    flat_loaded = {_path_names(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    kept, reinit = 0, []

    def pick(path, x):
        nonlocal kept
        v = flat_loaded.get(_path_names(path))
        if v is not None and tuple(v.shape) == tuple(x.shape):
            kept += 1
            return jnp.asarray(v, x.dtype)
        reinit.append("/".join(_path_names(path)))
        return x

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    logging.info("%s: loaded %d arrays, %d freshly initialised", what, kept, len(reinit))
    return merged


def initial_variables(
    config: ml_collections.ConfigDict, key: jax.Array, image_size, pretrained: bool = True
) -> dict:
    """Fresh variables, optionally from a Mask R-CNN or a backbone checkpoint."""
    variables = init_model(config.model, key, image_size)
    if not pretrained:
        return variables
    if config.init.checkpoint:
        loaded, _ = ckpt.load_model(config.init.checkpoint)
        variables = _merge_pretrained(variables, loaded, config.init.checkpoint)
    elif config.init.backbone_checkpoint:
        from maskrcnn_jax import convert

        backbone = convert.load_torchvision_backbone(config.init.backbone_checkpoint, config.model)
        variables = _merge_pretrained(variables, backbone, config.init.backbone_checkpoint)
    return variables


def create_train_state(
    config: ml_collections.ConfigDict, optimizer_for: Callable[[Any], optax.GradientTransformation],
    key: jax.Array, image_size, pretrained: bool = True,
) -> tuple[TrainState, optax.GradientTransformation]:
    k_init, k_train = jax.random.split(key)
    variables = initial_variables(config, k_init, image_size, pretrained)
    params = variables["params"]
    optimizer = optimizer_for(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        constants=variables.get("constants", {}),
        opt_state=optimizer.init(params),
        rng=k_train,
        bad_steps=jnp.zeros((), jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )
    return state, optimizer


# ---------------------------------------------------------------- the loop


class _Preemption:
    """Turns SIGTERM (Cloud TPU preemption) into a flag the loop checks."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            logging.warning("SIGTERM received: saving a checkpoint and stopping")
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per line) plus TensorBoard events."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard files are optional
            self._tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _py(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _py(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def _data_config(config, workdir: str):
    """The dataset config; prepared data defaults to ``WORKDIR/data``."""
    ds = ml_collections.ConfigDict(config.dataset.to_dict())
    if not ds.data_dir and not os.environ.get("MASKRCNN_JAX_DATA_DIR"):
        ds.data_dir = os.path.join(workdir, "data")
    return ds


def _model_config_with_categories(config, workdir: str) -> ml_collections.ConfigDict:
    """The model config plus the dataset's class names and category ids."""
    from maskrcnn_jax import data

    model_config = ml_collections.ConfigDict(config.model.to_dict())
    categories = data.get_category_map(_data_config(config, workdir))
    model_config.class_names = ["__background__"] + list(categories.names)
    model_config.category_ids = [0] + [int(c) for c in categories.category_ids]
    return model_config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

    Returns:
      The final metrics (last logged losses and, if evaluated, COCO metrics).
    """
    from tqdm import tqdm

    from maskrcnn_jax import data

    sharding.maybe_initialize_distributed()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.train.get("num_devices") or None)
    sharding.check_batch_size(config.train.batch_size, mesh)

    model_config = _model_config_with_categories(config, workdir)
    if model_config.num_classes != len(model_config.class_names):
        raise ValueError(
            f"config.model.num_classes={model_config.num_classes} but the dataset has "
            f"{len(model_config.class_names) - 1} classes + background"
        )
    model = MaskRCNN(config.model)
    image_size = tuple(config.dataset.image_size)

    # State, created directly with its sharding (replicated over 'data').
    key = jax.random.key(config.seed)
    optimizer_holder = {}

    def optimizer_for(params):
        optimizer_holder["opt"] = make_optimizer(config, params)
        return optimizer_holder["opt"]

    abstract_state = jax.eval_shape(
        lambda k: create_train_state(config, optimizer_for, k, image_size, pretrained=False)[0], key
    )
    state_sharding = sharding.tree_replicated(abstract_state, mesh)
    manager = ckpt.make_manager(
        os.path.join(workdir, ckpt.CHECKPOINT_SUBDIR),
        max_to_keep=config.keep_checkpoints,
        item_names=("model", "model_config", "train_state", "data_state"),
    )
    train_iter = data.make_train_iterator(
        _data_config(config, workdir), seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), batch_size=config.train.batch_size,
    )
    latest = manager.latest_step()
    if latest is None:
        state, optimizer = create_train_state(config, optimizer_for, key, image_size)
        state = jax.device_put(state, state_sharding)
    else:
        state, optimizer = _restore(manager, latest, abstract_state, state_sharding, train_iter, optimizer_holder)
        logging.info("resumed from step %d of %s", latest, manager.directory)

    step_fn = jax.jit(
        make_train_step(model, config, optimizer),
        in_shardings=(state_sharding, sharding.data_sharded(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    writer = MetricsWriter(workdir, enabled=is_main)
    start = int(state.step)
    total = int(config.train.steps)
    last: dict[str, Any] = {}
    progress = tqdm(total=total, initial=start, disable=not is_main, desc="train", dynamic_ncols=True)
    t_log, n_log = time.perf_counter(), 0

    def save(step):
        manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(state.variables()),
                model_config=ocp.args.JsonSave(ckpt.config_to_dict(model_config)),
                train_state=ocp.args.StandardSave(
                    {"step": state.step, "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng),
                     "bad_steps": state.bad_steps, "skipped_steps": state.skipped_steps}
                ),
                data_state=ocp.args.JsonSave({"state": train_iter.get_state().decode("utf-8")}),
            ),
            force=True,
        )

    with _Preemption() as preemption, mesh:
        step = start
        while step < total:
            local = next(train_iter)
            batch = sharding.global_batch({k: local[k] for k in TRAIN_KEYS}, mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            n_log += 1
            progress.update(1)
            if step % config.log_every == 0 or step == total:
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - t_log
                last = {k: _py(v) for k, v in metrics.items() if k != "finite"}
                last["images_per_sec"] = n_log * config.train.batch_size / max(elapsed, 1e-9)
                last["skipped_steps"] = int(state.skipped_steps)
                writer.write(step, last)
                progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.4f}")
                t_log, n_log = time.perf_counter(), 0
            bad = int(state.bad_steps) if config.train.max_bad_steps else 0
            if config.train.max_bad_steps and bad >= config.train.max_bad_steps:
                save(step)
                manager.wait_until_finished()
                raise TrainingError(
                    f"{bad} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                    "stopping. Lower train.base_lr or enable train.clip_norm."
                )
            if step % config.checkpoint_every == 0 or step == total or preemption.requested:
                save(step)
            if preemption.requested:
                manager.wait_until_finished()
                progress.close()
                logging.warning("stopped at step %d after SIGTERM; rerun to resume", step)
                return last
            if config.eval_every and step % config.eval_every == 0 and step != total:
                last.update(_evaluate(config, state, model_config, writer, step, workdir))
        manager.wait_until_finished()
    progress.close()
    if config.eval_at_end:
        last.update(_evaluate(config, state, model_config, writer, total, workdir, pictures=config.num_pictures))
    writer.close()
    train_iter.close()
    return last


def _restore(manager, step, abstract_state, state_sharding, train_iter, optimizer_holder):
    """Restores the train state (with its sharding) and the input position."""
    shard = lambda tree, shardings: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )
    abstract_vars = abstract_state.variables()
    vars_sharding = state_sharding.variables()
    abstract_train = {
        "step": abstract_state.step, "opt_state": abstract_state.opt_state,
        "rng": jax.eval_shape(jax.random.key_data, abstract_state.rng),
        "bad_steps": abstract_state.bad_steps, "skipped_steps": abstract_state.skipped_steps,
    }
    train_sharding = jax.tree.map(lambda _: state_sharding.step, abstract_train)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(shard(abstract_vars, vars_sharding)),
            train_state=ocp.args.StandardRestore(shard(abstract_train, train_sharding)),
            data_state=ocp.args.JsonRestore(),
        ),
    )
    train_iter.set_state(restored["data_state"]["state"].encode("utf-8"))
    t, v = restored["train_state"], restored["model"]
    state = abstract_state.replace(
        step=t["step"], params=v["params"], constants=v.get("constants", {}),
        opt_state=t["opt_state"], rng=jax.random.wrap_key_data(t["rng"]),
        bad_steps=t["bad_steps"], skipped_steps=t["skipped_steps"],
    )
    return state, optimizer_holder["opt"]


def _evaluate(config, state, model_config, writer, step, workdir, pictures: int = 0) -> dict[str, float]:
    """COCO bbox + segm AP on the validation split; optional pictures."""
    from maskrcnn_jax import evaluation

    metrics = evaluation.evaluate_during_training(
        config, jax.device_get(state.variables()), model_config, workdir, step, pictures
    )
    writer.write(step, metrics)
    return metrics


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.", flag_values=flag_values)
    argv = list(sys.argv if argv is None else argv)
    try:
        flag_values(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if flag_values.config is None or not flag_values.workdir:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        final = train_and_evaluate(flag_values.config, flag_values.workdir)
    except (TrainingError, ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in final.items() if not isinstance(v, list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
