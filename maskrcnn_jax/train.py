"""Training: TrainState, the sharded train step, and the training loop.

Run::

    python -m maskrcnn_jax.train --config experiments/shapes.py --workdir runs/shapes
    python -m maskrcnn_jax.train --config experiments/coco_r50_fpn_1x.py --workdir runs/coco \\
        --config.dataset.train_annotations=... --config.train.steps=1000

Several processes (one per host of a GPU cluster, or several CPU processes on
one machine) add ``--coordinator_address=HOST0:PORT --num_processes=N
--process_id=I [--distributed_timeout=S]`` (README, "A GPU cluster").

Running the same command again resumes from the latest checkpoint in
``WORKDIR/checkpoints`` (step, parameters, optimiser state, RNG and the input
iterator position), so a resumed run reproduces the uninterrupted one.

The trainer is generic: the model computes its own losses
(:meth:`MaskRCNN.losses`), :mod:`maskrcnn_jax.optim` builds the optimiser and
:mod:`maskrcnn_jax.checkpoint` lays the state out on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm import tqdm

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import data, host_allocator, optim, sharding, validation, xla_options
from maskrcnn_jax.batch import TRAIN_KEYS
from maskrcnn_jax.metrics_writer import MetricsWriter, to_python
from maskrcnn_jax.modeling import MaskRCNN, init_model
from maskrcnn_jax.preemption import Preemption
from maskrcnn_jax.recipe import MOVED_TO_MODEL, validate_recipe  # noqa: F401 (its old home)
from maskrcnn_jax.torchvision_weights import load_torchvision_backbone

log = logging.getLogger(__name__)


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
        """The model's variables: ``{"params": ..., "constants": ...}`` (no empty constants)."""
        return {"params": self.params, **({"constants": self.constants} if self.constants else {})}


def create_train_state(
    variables: dict[str, Any], optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Step 0 of training from ``variables`` (``init_model``'s layout); jittable."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=variables["params"],
        constants=variables.get("constants", {}),
        opt_state=optimizer.init(variables["params"]),
        rng=rng,
        bad_steps=zero,
        skipped_steps=zero,
    )


def make_train_step(
    model: MaskRCNN, config: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step: (state, batch) -> (state, metrics).

    ``batch`` holds the :data:`TRAIN_KEYS` of one global batch (``image
    [B, H, W, 3]``, ``image_size [B, 2]`` and the ground truth that
    :meth:`MaskRCNN.losses` reads). A step whose loss or gradients are not
    finite is not applied: parameters and optimiser state stay as they were,
    ``bad_steps`` and ``skipped_steps`` count it.
    """
    schedule = optim.learning_rate_schedule(config.train)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            variables = state.replace(params=params).variables()
            terms = model.apply(
                variables, batch["image"], batch["image_size"], batch, key, method=MaskRCNN.losses
            )
            return sum(terms.values()), terms

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
        metrics = dict(
            terms,
            loss=loss,
            lr=schedule(state.step),
            finite=finite,
            grad_norm=optax.global_norm(grads),
            # Outside the state, which the loop donates: read a step late (see the loop).
            bad_steps=new_state.bad_steps,
        )
        return new_state, metrics

    return train_step


def jit_train_step(
    model: MaskRCNN,
    config: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state: TrainState,
) -> tuple[Callable, Any]:
    """:func:`make_train_step` jitted over ``mesh`` as the training loop runs it.

    The state is replicated and donated (pass a copy to keep yours); the batch's
    arrays are split along their first (batch) axis. ``state`` gives the
    structure only: a TrainState or its ``jax.eval_shape``.

    Returns:
      ``(step_fn, state_sharding)``; ``step_fn(state, batch) -> (state, metrics)``.
    """
    state_sharding = sharding.tree_replicated(state, mesh)
    step_fn = xla_options.jit(
        make_train_step(model, config, optimizer),
        in_shardings=(state_sharding, sharding.data_sharded(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    return step_fn, state_sharding


# ---------------------------------------------------------------- set-up


def initial_variables(
    config: ml_collections.ConfigDict, key: jax.Array, image_size: tuple[int, int]
) -> dict[str, Any]:
    """Fresh variables, or those of ``config.init``'s Mask R-CNN or backbone checkpoint."""
    variables = init_model(config.model, key, image_size)
    if config.init.checkpoint:
        loaded, _ = ckpt.load_model(config.init.checkpoint)
        variables = ckpt.merge_pretrained(variables, loaded, config.init.checkpoint)
    elif config.init.backbone_checkpoint:

        backbone = load_torchvision_backbone(config.init.backbone_checkpoint, config.model)
        variables = ckpt.merge_pretrained(variables, backbone, config.init.backbone_checkpoint)
    return variables


def log_devices(config: ml_collections.ConfigDict) -> None:
    """Logs the backend and devices in one line; warns in one line if an accelerator is missing.

    ``config.accelerator_recommended`` (True in the COCO configs) is read here
    and nowhere else: such a config on a CPU-only JAX trains, but slowly,
    usually because the CPU jaxlib was installed instead of the accelerator's.
    """
    devices = jax.devices()
    backend = jax.default_backend()
    log.info(
        "JAX backend %s: %d x %s, %d process(es)",
        backend,
        len(devices),
        devices[0].device_kind,
        jax.process_count(),
    )
    if config.get("accelerator_recommended", False) and backend == "cpu":
        log.warning(
            "this config is meant for a GPU or TPU but JAX found only a CPU; "
            "install the accelerator build: make train ACCEL=cuda13 (or cuda12, tpu)"
        )


def _data_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The dataset config; prepared data defaults to ``WORKDIR/data``."""
    ds = ml_collections.ConfigDict(config.dataset.to_dict())
    if not ds.data_dir and not os.environ.get("MASKRCNN_JAX_DATA_DIR"):
        ds.data_dir = os.path.join(workdir, "data")
    return ds


def _model_config_with_categories(config, workdir: str) -> ml_collections.ConfigDict:
    """The model config plus the dataset's class names and category ids."""
    model_config = ml_collections.ConfigDict(config.model.to_dict())
    categories = data.get_category_map(_data_config(config, workdir))
    model_config.class_names = ["__background__"] + list(categories.names)
    model_config.category_ids = [0] + [int(c) for c in categories.category_ids]
    if model_config.num_classes != len(model_config.class_names):
        raise ValueError(
            f"config.model.num_classes={model_config.num_classes} but the dataset has "
            f"{len(model_config.class_names) - 1} classes + background"
        )
    return model_config


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

    The input iterator, the metrics files and the checkpoint manager are
    closed on every way out: the end, an exception, or SIGTERM (which saves a
    checkpoint first).

    Returns:
      The final metrics (last logged losses and, if evaluated, COCO metrics).
    """
    sharding.maybe_initialize_distributed()
    log_devices(config)
    mesh = sharding.make_mesh(config.train.get("num_devices") or None)
    validate_recipe(config, mesh.size)  # before any data preparation or compilation
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if jax.process_count() > 1:  # One process prepares the shared data; the others wait.
        if is_main:
            data.prepare_train_data(_data_config(config, workdir))
        sharding.wait_for_processes("data prepared")
    model_config = _model_config_with_categories(config, workdir)
    schedule = optim.effective_schedule(config.train)
    log.info(schedule.describe(data.train_epoch_size(_data_config(config, workdir))))
    model = MaskRCNN(config.model)
    image_size = tuple(config.dataset.image_size)

    # The optimiser and the state's sharding, from shapes only.
    k_init, k_train = jax.random.split(jax.random.key(config.seed))
    abstract_variables = jax.eval_shape(lambda k: init_model(config.model, k, image_size), k_init)
    optimizer = optim.make_optimizer(config, abstract_variables["params"])
    init_state = lambda v, k: create_train_state(v, optimizer, k)
    abstract_state = jax.eval_shape(init_state, abstract_variables, k_train)
    step_fn, state_sharding = jit_train_step(model, config, optimizer, mesh, abstract_state)

    with contextlib.ExitStack() as stack:
        manager = stack.enter_context(
            ckpt.make_manager(
                os.path.join(workdir, ckpt.CHECKPOINT_SUBDIR),
                max_to_keep=config.keep_checkpoints,
                item_names=ckpt.TRAIN_ITEMS,
            )
        )
        writer = stack.enter_context(contextlib.closing(MetricsWriter(workdir, enabled=is_main)))
        train_iter = data.make_train_iterator(
            _data_config(config, workdir),
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            batch_size=config.train.batch_size,
        )
        # Every jit below names its NamedShardings, so no mesh context is entered (`with mesh:`
        # is deprecated and printed a warning at every start).
        with train_iter, Preemption() as preemption:
            latest = manager.latest_step()
            if latest is None:
                variables = initial_variables(config, k_init, image_size)
                state = jax.jit(init_state, out_shardings=state_sharding)(variables, k_train)
            else:
                state, data_state = ckpt.restore_train_state(
                    manager, latest, abstract_state, state_sharding
                )
                train_iter.set_state(data_state)
                log.info("resumed from step %d of %s", latest, manager.directory)

            def save(step):
                ckpt.save_train_state(manager, step, state, model_config, train_iter.get_state())

            step, total = int(state.step), schedule.steps
            last: dict[str, Any] = {}
            progress = stack.enter_context(
                tqdm(
                    total=total, initial=step, disable=not is_main, desc="train", dynamic_ncols=True
                )
            )
            t_log, n_log = time.perf_counter(), 0
            pending_bad = None  # the last step's bad_steps, not yet read

            def check_bad_steps(bad_steps, at_step):
                limit = config.train.max_bad_steps
                if not limit or bad_steps is None:  # off: no read of the device value
                    return
                bad = int(bad_steps)
                if bad >= limit:
                    manager.wait_until_finished()
                    if manager.latest_step() != step:  # the last step is saved already
                        save(step)
                        manager.wait_until_finished()
                    raise TrainingError(
                        f"{bad} consecutive steps had a non-finite loss or gradient (last at "
                        f"step {at_step}); stopping. Lower train.base_lr or enable "
                        "train.clip_norm."
                    )

            # One executable per canvas (dataset.aspect_canvases: two), compiled when
            # its first batch comes; every process gets that batch at the same step.
            compiled_steps: dict[tuple[int, ...], Any] = {}
            while step < total:
                local = next(train_iter)
                batch = sharding.global_batch({k: local[k] for k in TRAIN_KEYS}, mesh)
                canvas = tuple(batch["image"].shape[1:3])
                if canvas not in compiled_steps:  # All compiled before the next collective.
                    compiled_steps[canvas] = step_fn.lower(state, batch).compile()
                    log.info("compiled the train step for the %dx%d canvas", *canvas)
                    sharding.wait_for_processes(f"train step compiled {canvas[0]}x{canvas[1]}")
                state, metrics = compiled_steps[canvas](state, batch)
                step += 1
                n_log += 1
                progress.update(1)
                if step % config.log_every == 0 or step == total:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t_log
                    last = {k: to_python(v) for k, v in metrics.items() if k != "finite"}
                    last["images_per_sec"] = n_log * config.train.batch_size / max(elapsed, 1e-9)
                    last["skipped_steps"] = int(state.skipped_steps)
                    writer.write(step, last)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.4f}")
                    t_log, n_log = time.perf_counter(), 0
                # The previous step's count, read now that this step is queued: reading this
                # step's would wait for it every step, and the host would prepare the next
                # batch only after it (no overlap of input and compute). A run of bad steps
                # is therefore stopped one (skipped, harmless) step late.
                check_bad_steps(pending_bad, step - 1)
                pending_bad = metrics["bad_steps"]
                if step % config.checkpoint_every == 0 or step == total or preemption.requested:
                    save(step)
                if preemption.requested:
                    break
                # Evaluation runs on process 0 alone, with the replicated parameters: the
                # same AP as a one-process run; the others wait at the next step.
                evaluate_now = config.eval_every and step % config.eval_every == 0
                if evaluate_now and step != total and is_main:
                    last.update(_evaluate(config, state, model_config, writer, step, workdir))
            if not preemption.requested:
                check_bad_steps(pending_bad, step)
            manager.wait_until_finished()
        if preemption.requested:
            log.warning("stopped at step %d after SIGTERM; rerun to resume", step)
            return last
        progress.close()
        if config.eval_at_end and is_main:
            pictures = config.num_pictures
            last.update(_evaluate(config, state, model_config, writer, total, workdir, pictures))
        return last


def _evaluate(config, state, model_config, writer, step, workdir, pictures: int = 0) -> dict:
    """COCO bbox + segm AP on the validation split; optional pictures."""

    metrics = validation.evaluate_during_training(
        config, jax.device_get(state.variables()), model_config, workdir, step, pictures
    )
    writer.write(step, metrics)
    return metrics


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m maskrcnn_jax.train --config FILE --workdir DIR [--config.x=y ...]``."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file.", flag_values=flag_values, lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.", flag_values=flag_values)
    flags.DEFINE_string(
        "coordinator_address", None,
        "HOST:PORT of process 0, for a multi-process run started by hand (one process per "
        "host); without it TPU pods, SLURM and Open MPI are detected automatically.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=flag_values)
    flags.DEFINE_integer(
        "process_id", None, "This process, 0..num_processes-1.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "distributed_timeout", None,
        "Seconds to join the coordinator, and after which a silent process is declared dead "
        "so that the others exit (JAX's defaults: 300 and 100).",
        flag_values=flag_values,
    )
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
        sharding.maybe_initialize_distributed(
            flag_values.coordinator_address,
            flag_values.num_processes,
            flag_values.process_id,
            flag_values.distributed_timeout,
        )
        if jax.default_backend() == "cpu" and host_allocator.keep_freed_blocks():
            logging.info("host allocator: freed large blocks are kept for reuse "
                         "(%s=1 keeps glibc's defaults)", host_allocator.DEFAULTS_ENV)
        final = train_and_evaluate(flag_values.config, flag_values.workdir)
    except (TrainingError, ValueError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in final.items() if not isinstance(v, list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
