"""Host-side input pipeline: prepared dataset -> fixed-shape numpy batches.

grain's DataLoader reads the array_record files through ``tfds`` data sources
(no TensorFlow), runs ``transforms.preprocess`` in ``num_workers`` worker
processes and batches. The stream is a function of the seed, the batch
size, ``num_workers`` and the process count: shuffling is grain's per-epoch
index shuffle, augmentation uses grain's per-record generator (seed + the
record's position in the stream), and each worker batches its own share of
the records (so changing ``num_workers`` regroups the batches). The
iterator's ``get_state()`` / ``set_state()`` resume a stream exactly (grain's
orbax checkpoint handler accepts the iterator too; grain refuses a state
saved with a different worker count).

Batch (B = per-process batch size, M = max_instances, S = mask_size, [H, W]
= image_size); see ``transforms.py`` for the padding values::

    image          [B, H, W, 3] uint8 (or float32) RGB 0..255, un-normalised
    boxes          [B, M, 4] float32 xyxy, padded-input pixels
    labels         [B, M] int32 1..K, 0 in padding slots
    masks          [B, M, S, S] uint8 {0, 1}, each instance's mask cropped to its box
    is_crowd       [B, M] bool
    valid          [B, M] bool
    image_id       [B] int32
    original_size  [B, 2] int32 (h, w) before resizing
    image_size     [B, 2] int32 (h, w) of the resized image inside the padding
    scale          [B] float32 resize factor
    valid_image    [B] bool (False: padding example of the last eval batch)
    num_truncated  [B] int32 instances dropped over max_instances

The model normalises the image itself (torchvision's mean/std); the pipeline
ships raw 0..255 uint8, a quarter of float32's host-to-device traffic.
"""

from __future__ import annotations

import atexit
import logging
import math
import weakref
from typing import Any, Iterator

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from maskrcnn_jax.data import transforms
from maskrcnn_jax.data.datasets import PreparedDataset, dataset_config, prepare_dataset

logger = logging.getLogger(__name__)

BATCH_KEYS = (
    "image", "boxes", "labels", "masks", "is_crowd", "valid", "image_id", "original_size",
    "image_size", "scale", "valid_image", "num_truncated",
)


def make_train_iterator(
    config: ml_collections.ConfigDict,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    batch_size: int | None = None,
) -> InputIterator:
    """Infinite, per-epoch shuffled training batches of this process's shard.

    Prepares the dataset if needed. Each process reads a disjoint
    ``1/process_count`` of the train split (records beyond an even split are
    dropped), reshuffled every epoch.

    Args:
      config: dataset config (or a config with a ``dataset`` field).
      seed: shuffling and augmentation seed (0 <= seed < 2**32).
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      batch_size: global batch size; default ``config.train_batch_size``.

    Returns:
      An :class:`InputIterator` of batches (module docstring) of
      ``batch_size // process_count`` examples; ``get_state()`` /
      ``set_state()`` resume it exactly.
    """
    c = dataset_config(config)
    per_process = _per_process_batch(batch_size or c.train_batch_size, process_count)
    prepared = prepare_dataset(c)
    spec = transforms.InputSpec.from_config(c)
    source = prepared.data_source("train")
    _warn_truncation(prepared, "train", spec.max_instances)
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=int(seed),
    )
    operations: list[Any] = []
    if c.drop_empty_images:
        operations.append(_HasInstances())
    operations += [_TrainPreprocess(spec), grain.Batch(per_process, drop_remainder=True)]
    return _iterate(source, sampler, operations, c)


def make_eval_iterator(
    config: ml_collections.ConfigDict,
    split: str = "validation",
    process_index: int = 0,
    process_count: int = 1,
    *,
    batch_size: int | None = None,
) -> InputIterator:
    """One deterministic pass over a split, no augmentation, every batch full.

    The split is padded with padding examples (``valid_image`` False,
    ``image_id`` -1, nothing valid) to a multiple of the global batch size
    times ``max(num_workers, 1)``, so all processes yield the same number of
    full batches and every real image is seen exactly once across processes.

    Args:
      config: dataset config (or a config with a ``dataset`` field).
      split: ``'validation'`` or ``'train'``.
      process_index: this process.
      process_count: number of processes.
      batch_size: global batch size; default ``config.eval_batch_size``.

    Returns:
      An :class:`InputIterator` of ``len(padded split) / batch_size`` batches
      of ``batch_size // process_count`` examples (module docstring).
    """
    c = dataset_config(config)
    global_batch = batch_size or c.eval_batch_size
    per_process = _per_process_batch(global_batch, process_count)
    prepared = prepare_dataset(c)
    spec = transforms.InputSpec.from_config(c)
    source = prepared.data_source(split)
    _warn_truncation(prepared, split, spec.max_instances)
    # grain splits a process's records across its workers, and each worker
    # batches its own share: pad so that every worker's share is whole batches.
    multiple = global_batch * max(int(c.num_workers), 1)
    padded = _PaddedSource(source, math.ceil(len(source) / multiple) * multiple)
    sampler = grain.IndexSampler(
        num_records=len(padded),
        shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=False),
        shuffle=False,
        num_epochs=1,
    )
    operations = [_EvalPreprocess(spec), grain.Batch(per_process, drop_remainder=False)]
    return _iterate(padded, sampler, operations, c)


class InputIterator:
    """Batches of a grain DataLoader, with resumable state and explicit shutdown.

    ``get_state() -> bytes`` and ``set_state(bytes)`` are grain's (so grain's
    orbax ``PyGrainCheckpointHandler`` saves and restores this object);
    ``close()`` (or ``with``) stops the worker processes and frees their
    shared memory; iterators still open at interpreter exit are closed then.
    """

    def __init__(self, loader: grain.DataLoader):
        self._loader = loader
        self._iterator = iter(loader)
        _OPEN_ITERATORS.add(self)

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> bytes:
        """The position in the stream (JSON bytes)."""
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        """Continues the stream from a ``get_state()`` value."""
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops the workers; the iterator cannot be used afterwards."""
        inner = getattr(self._iterator, "_iterator", None)  # grain's DatasetIterator.
        if inner is not None and hasattr(inner, "close"):
            inner.close()

    def __enter__(self) -> InputIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_OPEN_ITERATORS: weakref.WeakSet[InputIterator] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    """Stops workers before interpreter teardown (grain's own cleanup is noisy then)."""
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


def _iterate(source, sampler, operations, c) -> InputIterator:
    _ensure_absl_flags_parsed()
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=int(c.num_workers),
        worker_buffer_size=max(int(c.prefetch), 1),
    )
    return InputIterator(loader)


class _TrainPreprocess(grain.RandomMapTransform):
    def __init__(self, spec: transforms.InputSpec):
        self.spec = spec

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return transforms.preprocess(element, self.spec, train=True, rng=rng)


class _EvalPreprocess(grain.MapTransform):
    def __init__(self, spec: transforms.InputSpec):
        self.spec = spec

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        if element.get("_padding", False):
            return transforms.empty_example(self.spec)
        return transforms.preprocess(element, self.spec, train=False)


class _HasInstances(grain.FilterTransform):
    """Keeps images with at least one non-crowd instance."""

    def filter(self, element: dict[str, Any]) -> bool:
        return not bool(np.all(np.asarray(element["objects"]["is_crowd"], bool)))


class _PaddedSource:
    """A data source extended to ``length`` records with padding markers."""

    def __init__(self, source: Any, length: int):
        self.source = source
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[index] if index < len(self.source) else {"_padding": True}


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} must be a positive multiple of process_count "
            f"{process_count}"
        )
    return global_batch // process_count


def _warn_truncation(prepared: PreparedDataset, split: str, max_instances: int) -> None:
    """Logs how many images of a split have more instances than max_instances."""
    hist = prepared.split_stats.get(split, {}).get("instances_per_image", {})
    over = {int(k): v for k, v in hist.items() if int(k) > max_instances}
    if over:
        logger.warning(
            "%s: %d images have more than max_instances=%d instances; %d instances per "
            "epoch will be truncated (before crop; counted per batch in 'num_truncated')",
            split, sum(over.values()), max_instances,
            sum((k - max_instances) * v for k, v in over.items()),
        )


def _ensure_absl_flags_parsed() -> None:
    """grain reads absl flags in its workers; outside absl.app they are unparsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def take(iterator: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The next ``n`` batches as plain numpy arrays (copies; for tests and tools)."""
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(n)]
