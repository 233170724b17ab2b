"""Host-side input pipeline: prepared dataset -> fixed-shape numpy batches.

grain's DataLoader reads the array_record files through ``tfds`` data sources
(no TensorFlow), runs ``transforms.preprocess`` in ``num_workers`` worker
processes and batches. The training stream is a function of the seed and the
global batch size only: shuffling is grain's per-epoch index shuffle of the
whole split, global batch ``n`` is positions ``n*B .. n*B+B-1`` of that
shuffled stream, and augmentation uses grain's per-record generator (seed +
the record's position in the global stream). Process ``p`` of ``P`` reads
rows ``p*B/P .. (p+1)*B/P-1`` of every global batch (:class:`_GlobalBatchSampler`),
so the processes' batches, concatenated in process order, are the same
images in the same order whatever ``P`` and ``num_workers`` are (with
``drop_empty_images``, a dropped record is replaced by the next one of the
same process and worker, so that option keeps only the seed's determinism).
The iterator's ``get_state()`` / ``set_state()`` resume a stream exactly
(grain's orbax checkpoint handler accepts the iterator too; grain refuses a
state saved with a different worker count or by another process).

With ``dataset.aspect_canvases`` the shuffled stream is replaced by
``aspect_groups.AspectGroupedOrder``: each global batch holds images of one
orientation, padded to that orientation's canvas, and the order is a function
of the seed, the epoch and the records' orientations (read once,
``record_sizes.py``), so every process feeds the same orientation at each
step. Images without a non-crowd instance are then left out of the order
itself (``drop_empty_images``), which keeps the global batch independent of
the process count with that option too.

A batch holds ``BATCH_KEYS`` with the shapes and dtypes of
``maskrcnn_jax/batch.py`` (B = per-process batch size), e.g. ``image [B, H, W,
3] uint8`` RGB 0..255, un-normalised: the model normalises the image itself
(torchvision's mean/std); shipping raw uint8 is a quarter of float32's
host-to-device traffic.

Worker processes and shared memory. With ``num_workers > 0`` grain's workers
hand batches over in POSIX shared memory. Here each batch's shared-memory
names are unlinked as soon as it is received (its pages stay mapped, and are
freed when its arrays are), so no batch handed out can outlive the process
in ``/dev/shm``; ``InputIterator.close()`` stops the workers and unlinks what
they had prefetched. Iterators still open are closed at interpreter exit and,
unless the application has its own SIGTERM handler, on SIGTERM (the process
then dies of the signal as before). A worker exits by itself when the process
that started it dies (even by SIGKILL).
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import weakref
from typing import Any, Iterator

import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from maskrcnn_jax.batch import BATCH_KEYS
from maskrcnn_jax.data import transforms
from maskrcnn_jax.data.aspect_groups import AspectGroupedOrder
from maskrcnn_jax.data.datasets import PreparedDataset, dataset_config, prepare_dataset
from maskrcnn_jax.data.record_sizes import record_sizes

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_KEYS",
    "InputIterator",
    "make_train_iterator",
    "prepare_train_data",
    "take",
    "train_epoch_size",
]


def make_train_iterator(
    config: ml_collections.ConfigDict,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    batch_size: int,
) -> InputIterator:
    """Infinite, per-epoch shuffled training batches of this process's shard.

    Prepares the dataset if needed. All processes shuffle the whole train
    split alike (reshuffled every epoch); each reads its own rows of every
    global batch (module docstring), so the global batch does not depend on
    the process count.

    Args:
      config: dataset config (or a config with a ``dataset`` field).
      seed: shuffling and augmentation seed (0 <= seed < 2**32).
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      batch_size: global batch size (training's ``train.batch_size``).

    Returns:
      An :class:`InputIterator` of batches (``maskrcnn_jax/batch.py``) of
      ``batch_size // process_count`` examples; ``get_state()`` /
      ``set_state()`` resume it exactly.
    """
    c = dataset_config(config)
    per_process = _per_process_batch(batch_size, process_count)
    spec = transforms.InputSpec.from_config(c)
    prepared = prepare_train_data(c)
    source = prepared.data_source("train")
    _warn_truncation(prepared, "train", spec.max_instances)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
    operations: list[Any] = []
    if spec.aspect_canvases:
        # Empty images are left out of the order itself: a filter would shift
        # later records into a batch of the other orientation.
        sizes = record_sizes(prepared, "train")
        usable = np.ones(len(source), bool)
        if c.drop_empty_images:
            usable = sizes.num_instances > 0
            logger.info(
                "drop_empty_images: %d of %d train images have no non-crowd instance and are "
                "dropped", len(source) - int(usable.sum()), len(source),
            )  # fmt: skip
        order = AspectGroupedOrder(
            transforms.is_portrait(sizes.height, sizes.width), usable, batch_size, int(seed)
        )
        logger.info(
            "aspect canvases %s: %d landscape and %d portrait train images, %d batches of %d "
            "per epoch", spec.aspect_canvases, order.num_landscape, order.num_portrait,
            order.batches_per_epoch, batch_size,
        )  # fmt: skip
    else:
        order = grain.IndexSampler(
            num_records=len(source), shuffle=True, num_epochs=None, seed=int(seed)
        )
        if c.drop_empty_images:
            operations.append(_HasInstances())
            dropped, exact = _num_dropped(prepared, "train")
            logger.info(
                "drop_empty_images: %s%d of %d train images have no non-crowd instance and are "
                "dropped", "" if exact else "at least ", dropped, len(source),
            )  # fmt: skip
    sampler = _GlobalBatchSampler(
        order,
        process_index=process_index,
        process_count=process_count,
        per_process=per_process,
        num_workers=int(c.num_workers),
    )
    operations += [_TrainPreprocess(spec), grain.Batch(per_process, drop_remainder=True)]
    return _iterate(source, sampler, operations, c)


def prepare_train_data(config: ml_collections.ConfigDict) -> PreparedDataset:
    """Prepares the dataset and what the training order needs (a no-op once done).

    With ``aspect_canvases`` the order needs every train record's size: read
    once and cached beside the prepared files (``record_sizes.py``). In a
    multi-process run one process calls this before the others start reading.

    Args:
      config: dataset config (or a config with a ``dataset`` field).
    """
    c = dataset_config(config)
    prepared = prepare_dataset(c)
    if "train" in prepared.splits and transforms.InputSpec.from_config(c).aspect_canvases:
        record_sizes(prepared, "train")
    return prepared


class _GlobalBatchSampler:
    """Hands process ``p`` its rows of each global batch of one shuffled stream.

    grain's DataLoader asks the sampler for indices ``i = k * P + p`` (``k``
    = 0, 1, ... its local record count, ``P`` = ``shard_options.shard_count``)
    and worker ``j`` of ``w`` batches the local records ``k = j, j + w, ...``
    in order, the workers' batches interleaving round robin. Local record
    ``k`` is therefore row ``e`` of this process's batch ``n``
    (``q = k // w``, ``n = (q // b) * w + k % w``, ``e = q % b``, ``b`` = the
    per-process batch), which is position ``n * B + p * b + e`` of the
    global stream (``B = P * b``). grain's sharding of the record *range*
    (each process shuffling its own block) would give a different global
    batch for every process count.

    The record's metadata keeps grain's index ``i`` (its iterator state counts
    those) and takes the key and the augmentation generator of the global
    position.
    """

    def __init__(
        self,
        inner: grain.IndexSampler,
        *,
        process_index: int,
        process_count: int,
        per_process: int,
        num_workers: int,
    ):
        self._inner = inner
        self._p, self._count, self._b = process_index, process_count, per_process
        self._w = max(num_workers, 1)
        # Read by grain's DataLoader: it then asks for indices p, p + P, ...
        self._shard_options = grain.ShardOptions(process_index, process_count)

    def __len__(self) -> int:
        return len(self._inner)

    def __repr__(self) -> str:  # grain checks it against a restored state
        return (
            f"_GlobalBatchSampler({self._inner!r}, process_index={self._p}, "
            f"process_count={self._count}, per_process={self._b}, workers={self._w})"
        )

    def global_position(self, index: int) -> int:
        """The position in the global stream of grain's sampler index ``index``."""
        k = (index - self._p) // self._count
        q, j = divmod(k, self._w)
        m, e = divmod(q, self._b)
        n = m * self._w + j
        return n * self._b * self._count + self._p * self._b + e

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        meta = self._inner[self.global_position(index)]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)


class InputIterator:
    """Batches of a grain DataLoader, with resumable state and explicit shutdown.

    ``get_state() -> bytes`` and ``set_state(bytes)`` are grain's (so grain's
    orbax ``PyGrainCheckpointHandler`` saves and restores this object);
    ``close()`` (or ``with``) stops the worker processes and unlinks the
    shared memory they had prefetched. Each batch's own shared memory is
    unlinked when it is received (module docstring). Iterators still open at
    interpreter exit, or when a SIGTERM arrives while SIGTERM has its default
    action, are closed then.
    """

    def __init__(self, loader: grain.DataLoader):
        self._loader = loader
        self._iterator = iter(loader)
        self._closed = False
        _OPEN_ITERATORS.add(self)
        _install_sigterm_handler()

    def __iter__(self) -> InputIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise ValueError("the input iterator is closed")
        batch = next(self._iterator)
        for value in batch.values():
            _unlink_on_receipt(value)
        return batch

    def get_state(self) -> bytes:
        """The position in the stream (JSON bytes)."""
        if self._closed:
            raise ValueError("the input iterator is closed")
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        """Continues the stream from a ``get_state()`` value."""
        if self._closed:
            raise ValueError("the input iterator is closed")
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops the workers and frees their shared memory; idempotent.

        The iterator cannot be used afterwards; batches already received stay
        valid.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN_ITERATORS.discard(self)
        inner = getattr(self._iterator, "_iterator", None)  # grain's DatasetIterator.
        if inner is not None and hasattr(inner, "close"):
            inner.close()  # Joins the workers and unlinks their queued batches.
        # Drop grain's objects now: collected during interpreter teardown, their
        # __del__ would close them again and fail noisily on cleared modules.
        self._iterator = self._loader = None

    def __enter__(self) -> InputIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


_OPEN_ITERATORS: weakref.WeakSet[InputIterator] = weakref.WeakSet()


def _unlink_on_receipt(array: Any) -> None:
    """Unlinks the shared-memory name behind a received grain array, if any.

    grain's ``SharedMemoryArray`` unlinks its block when the array is garbage
    collected, from a background thread; an array still alive at exit (held
    by a device buffer, say) or collected just before it is never unlinked,
    and the resource tracker reports it as leaked. Unlinking at once removes
    only the name: the mapping, and so the array, stays valid until the
    array is freed. The array is then told not to unlink again.
    """
    shm = getattr(array, "shm", None)
    if shm is None or not getattr(array, "_unlink_on_del", False):
        return  # A plain array (num_workers=0, or a small array grain did not share).
    array._unlink_on_del = False  # grain's flag: its __del__ now only unmaps.
    try:
        shm.unlink()  # Also unregisters the block from the resource tracker.
    except FileNotFoundError:
        pass


@atexit.register
def _close_open_iterators() -> None:
    """Stops workers before interpreter teardown (grain's own cleanup is noisy then)."""
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()


_SIGTERM_LOCK = threading.Lock()
_SIGTERM_INSTALLED = False


def _install_sigterm_handler() -> None:
    """On SIGTERM: close the open iterators, then die of SIGTERM as before.

    Installed only where SIGTERM still has its default action (an
    application's own handler, such as training's preemption handler, is
    left alone: it owns the shutdown, and interpreter exit closes the
    iterators) and only from the main thread, where Python allows it.
    """
    global _SIGTERM_INSTALLED
    with _SIGTERM_LOCK:
        if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _close_and_terminate)
        _SIGTERM_INSTALLED = True


def _close_and_terminate(signum: int, frame: Any) -> None:
    """Closes the iterators, frees grain's semaphores, re-raises the signal.

    The process still dies of the signal (status -15, no Python exit
    handlers), as without this handler; collecting the closed iterators
    first lets ``multiprocessing`` unlink their semaphores, which the
    resource tracker would otherwise report as leaked.
    """
    global _SIGTERM_INSTALLED
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _SIGTERM_INSTALLED = False
    _close_open_iterators()
    gc.collect()
    os.kill(os.getpid(), signum)


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


# ------------------------------------------------------------ worker processes


_WATCHDOG_STARTED = False


def _exit_with_parent() -> None:
    """In a grain worker process: exit as soon as the parent process is gone.

    grain (0.2) offers no option for it, and its workers otherwise wait for
    the parent forever (a trainer killed with SIGKILL left one alive for
    hours). A daemon thread waits on the sentinel ``multiprocessing`` gives
    every spawned child (a pipe the parent holds open until it dies), then
    ends the process. Blocks the worker had in shared memory are unlinked by
    the resource tracker once both processes are gone. A no-op outside a
    ``multiprocessing`` child and after the first call.
    """
    global _WATCHDOG_STARTED
    parent = multiprocessing.parent_process()
    if parent is None or _WATCHDOG_STARTED:
        return
    _WATCHDOG_STARTED = True
    threading.Thread(
        target=_exit_when_ready, args=(parent.sentinel,), name="exit-with-parent", daemon=True
    ).start()


def _exit_when_ready(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


class _ExitsWithParent:
    """Transforms shipped to grain workers: unpickling one there starts the watchdog.

    grain's DataLoader takes no worker initialiser, but every worker unpickles
    the pipeline's transforms before it reads a record.
    """

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _exit_with_parent()


class _TrainPreprocess(_ExitsWithParent, grain.RandomMapTransform):
    def __init__(self, spec: transforms.InputSpec):
        self.spec = spec

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return transforms.preprocess(element, self.spec, train=True, rng=rng)


class _HasInstances(_ExitsWithParent, grain.FilterTransform):
    """Keeps images with at least one non-crowd instance."""

    def filter(self, element: dict[str, Any]) -> bool:
        return not bool(np.all(np.asarray(element["objects"]["is_crowd"], bool)))


def _num_dropped(prepared: PreparedDataset, split: str) -> tuple[int, bool]:
    """(images of ``split`` that ``drop_empty_images`` drops, whether the count is exact).

    Read from the preparation statistics (``num_without_instances``). A
    dataset prepared before that count existed, or one without statistics
    (shapes, whose images all have instances), gives the images with no
    annotation at all: a lower bound (crowd-only images are dropped too).
    """
    stats = prepared.split_stats.get(split, {})
    if "num_without_instances" in stats:
        return int(stats["num_without_instances"]), True
    return int(stats.get("instances_per_image", {}).get("0", 0)), False


def train_epoch_size(config: ml_collections.ConfigDict) -> int:
    """Training images per epoch over all processes (after ``drop_empty_images``).

    Prepares the dataset if needed (a no-op once prepared). A dataset prepared
    before crowd-only images were counted may hold a few fewer.

    Args:
      config: dataset config (or a config with a ``dataset`` field).
    """
    c = dataset_config(config)
    prepared = prepare_dataset(c)
    total = len(prepared.data_source("train"))
    return total - _num_dropped(prepared, "train")[0] if c.drop_empty_images else total


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
