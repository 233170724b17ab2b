"""The optimiser: SGD with momentum, warm-up + step decay, masked weight decay.

Built from the parameters' *structure* only (names, ranks), so the abstract
parameters of ``jax.eval_shape`` serve as well as real ones::

    abstract = jax.eval_shape(lambda k: init_model(config.model, k), key)
    optimizer = make_optimizer(config, abstract["params"])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The schedule a run follows, after scaling to its batch size.

    Detectron2's rule (``DefaultTrainer.auto_scale_workers``): with
    ``scale = reference_batch_size / batch_size`` the step counts are
    multiplied by ``scale`` (rounded) and the learning rate divided by it, so
    a run sees the same number of images, and takes the same total step in
    parameter space, at any batch size.

    Attributes:
      steps: total optimiser steps.
      warmup_steps: linear warm-up length in steps.
      decay_steps: steps at which the rate is multiplied by ``decay_factor``.
      lr: the rate after warm-up, before decay.
      batch_size: the global batch (``train.batch_size``).
      scale: ``reference_batch_size / batch_size``.
    """

    steps: int
    warmup_steps: int
    decay_steps: tuple[int, ...]
    lr: float
    batch_size: int
    scale: float

    def describe(self, num_images: int | None = None) -> str:
        """One log line: steps (and epochs of ``num_images``), LR, warm-up and decays."""
        epochs = ""
        if num_images:
            epochs = f" = {self.steps * self.batch_size / num_images:.2f} epochs of {num_images}"
        decays = ", ".join(str(s) for s in self.decay_steps) or "none"
        return (
            f"schedule: {self.steps} steps at batch {self.batch_size} (reference schedule "
            f"x{self.scale:g}; {self.steps * self.batch_size} images{epochs}), lr {self.lr:g} "
            f"after {self.warmup_steps} warm-up steps, decays at steps {decays}"
        )


def effective_schedule(train: ml_collections.ConfigDict) -> Schedule:
    """``config.train``'s schedule scaled from ``reference_batch_size`` to ``batch_size``.

    ``train.steps``, ``warmup_steps`` and ``decay_steps`` are written for
    ``reference_batch_size`` images per step; ``base_lr`` is the rate at that
    batch. At ``batch_size`` the steps are multiplied by
    ``reference_batch_size / batch_size`` and rounded, and the rate is
    ``base_lr * batch_size / reference_batch_size`` (the linear scaling rule).
    This module is the one reader of those fields.

    Args:
      train: ``config.train`` (``steps``, ``batch_size``,
        ``reference_batch_size``, ``base_lr``, ``warmup_steps``,
        ``decay_steps``).

    Returns:
      The :class:`Schedule` the run follows.
    """
    if train.batch_size < 1 or train.reference_batch_size < 1:
        raise ValueError(
            f"train.batch_size={train.batch_size} and train.reference_batch_size="
            f"{train.reference_batch_size} must be positive"
        )
    scale = train.reference_batch_size / train.batch_size
    steps = lambda n: int(round(int(n) * scale))
    return Schedule(
        steps=steps(train.steps),
        warmup_steps=steps(train.warmup_steps),
        decay_steps=tuple(steps(s) for s in train.decay_steps),
        lr=train.base_lr * train.batch_size / train.reference_batch_size,
        batch_size=int(train.batch_size),
        scale=scale,
    )


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up, then step decay (Detectron2's WarmupMultiStepLR).

    Steps and rate are :func:`effective_schedule`'s: scaled from
    ``reference_batch_size`` to ``batch_size``.

    Args:
      train: the ``config.train`` fields ``base_lr``, ``batch_size``,
        ``reference_batch_size``, ``steps``, ``warmup_steps``,
        ``warmup_factor``, ``decay_steps`` and ``decay_factor``.

    Returns:
      step (int scalar) -> float32 scalar learning rate.
    """
    spec = effective_schedule(train)
    warmup, factor = spec.warmup_steps, float(train.warmup_factor)
    boundaries = {s: float(train.decay_factor) for s in spec.decay_steps}
    decay = optax.piecewise_constant_schedule(spec.lr, boundaries)

    def schedule(step):
        alpha = jnp.clip(step / max(warmup, 1), 0.0, 1.0)
        warm = factor * (1 - alpha) + alpha
        return decay(step) * jnp.where(step < warmup, warm, 1.0)

    return schedule


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names along a ``jax.tree_util`` key path, e.g. ``("backbone", "conv1", "kernel")``."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_mask(params: Any, freeze_at: int) -> Any:
    """True for backbone parameters of stages frozen by ``freeze_at``.

    Stage 1 is the stem (``conv1``), stage k >= 2 is ``layer{k-1}_*``. Their
    gradients are already zero (``stop_gradient``); the mask keeps weight
    decay and momentum from moving them.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      freeze_at: the model config's ``freeze_at``.

    Returns:
      A tree of Python bools with the structure of ``params``.
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
    """Weight decay on kernels (rank > 1); on biases and norm scales only if asked.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A tree of Python bools with the structure of ``params``.
    """
    return jax.tree.map(lambda p: bool(decay_norm_and_bias) or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """SGD with momentum, masked weight decay, optional clipping; frozen params fixed.

    Args:
      config: the experiment config (``config.train`` and ``config.model.freeze_at``).
      params: the parameter tree; only its structure and ranks are read, so
        abstract parameters (``jax.eval_shape``) do.

    Returns:
      The optax transformation.
    """
    train = config.train
    chain = []
    if train.clip_norm:
        chain.append(optax.clip_by_global_norm(train.clip_norm))
    chain += [
        optax.add_decayed_weights(
            train.weight_decay, mask=decay_mask(params, train.decay_norm_and_bias)
        ),
        optax.sgd(learning_rate_schedule(train), momentum=train.momentum),
    ]
    opt = optax.chain(*chain)
    frozen = frozen_mask(params, config.model.freeze_at)
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
