"""The training order of aspect-ratio canvases: every global batch of one orientation.

With ``dataset.aspect_canvases`` each global batch must hold images of one
orientation (they share one canvas, so one compiled step), and with several
processes every process must feed the same orientation at the same step, or
the global array cannot be assembled. :class:`AspectGroupedOrder` therefore
decides the whole order globally, from the seed, the epoch and each record's
orientation only, identically in every process and worker:

1. epoch ``e`` shuffles the usable records (``default_rng((seed, e, 0))``);
2. splits that order by orientation, keeping it, and cuts each part into
   global batches of ``B`` (the remainder of each, fewer than ``B`` images,
   sits this epoch out; the next epoch's shuffle drops others);
3. interleaves the two batch sequences in a seeded random order
   (``default_rng((seed, e, 1))``).

Every epoch has the same number of batches ``K`` (the per-orientation counts
do not change), so global position ``t`` is row ``t % B`` of batch
``(t // B) % K`` of epoch ``t // (B * K)``. ``_GlobalBatchSampler`` (in
``input_pipeline.py``) hands process ``p`` its rows of each global batch, as
it does for the plain shuffled order, so a process's batch is always one
orientation; grain's iterator state (positions) resumes it exactly.
"""

from __future__ import annotations

import logging
import sys

import grain.python as grain
import numpy as np

logger = logging.getLogger(__name__)

_PLANS_KEPT = 4  # Epoch plans cached (workers read neighbouring epochs at a boundary).


class AspectGroupedOrder:
    """Global position -> record, each global batch of ``batch_size`` one orientation.

    Plays grain's ``IndexSampler`` for one process with no sharding (the
    caller shards): ``order[t]`` is a ``RecordMetadata`` with ``index=t``,
    the record key and grain's per-position augmentation generator
    (``Philox(key=seed + t)``, as ``IndexSampler``).

    Args:
      portrait: [N] bool per record in data-source order, True for portrait.
      usable: [N] bool, False for records never to train on (e.g. no instance).
      batch_size: B, the global batch size.
      seed: 0 <= seed < 2**32.

    Raises:
      ValueError: if neither orientation has ``batch_size`` usable records.
    """

    def __init__(self, portrait: np.ndarray, usable: np.ndarray, batch_size: int, seed: int):
        portrait = np.asarray(portrait, bool).reshape(-1)
        usable = np.asarray(usable, bool).reshape(-1)
        if portrait.shape != usable.shape:
            raise ValueError(f"portrait {portrait.shape} and usable {usable.shape} differ")
        if batch_size < 1 or not 0 <= seed < 2**32:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= seed < 2**32, got {batch_size} and {seed}"
            )
        self._portrait, self._b, self._seed = portrait, int(batch_size), int(seed)
        self._records = np.flatnonzero(usable)  # [U] usable record keys
        self.num_portrait = int(portrait[self._records].sum())
        self.num_landscape = len(self._records) - self.num_portrait
        self._batches = (self.num_landscape // self._b, self.num_portrait // self._b)
        if not sum(self._batches):
            raise ValueError(
                f"aspect canvases: {self.num_landscape} landscape and {self.num_portrait} "
                f"portrait training images, fewer than the batch size {self._b} of either; "
                "lower train.batch_size or set dataset.aspect_canvases=()"
            )
        for name, n in (("landscape", self.num_landscape), ("portrait", self.num_portrait)):
            if 0 < n < self._b:
                logger.warning(
                    "aspect canvases: the %d %s training images never fill a batch of %d and "
                    "are never seen", n, name, self._b,
                )  # fmt: skip
        self._plans: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        """K, global batches per epoch (landscape + portrait)."""
        return sum(self._batches)

    @property
    def images_per_epoch(self) -> int:
        """K * B: the images one epoch trains on."""
        return self.batches_per_epoch * self._b

    def __len__(self) -> int:
        return sys.maxsize  # Infinite, like IndexSampler(num_epochs=None).

    def __repr__(self) -> str:  # grain checks it against a restored state
        return (
            f"AspectGroupedOrder(records={len(self._portrait)}, landscape={self.num_landscape},"
            f" portrait={self.num_portrait}, batch_size={self._b}, seed={self._seed})"
        )

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """[K, B] record keys of epoch ``epoch``'s global batches, in training order."""
        plan = self._plans.get(epoch)
        if plan is None:
            plan = self._make_plan(epoch)
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan
        return plan

    def _make_plan(self, epoch: int) -> np.ndarray:
        b = self._b
        order = self._records[np.random.default_rng((self._seed, epoch, 0)).permutation(
            len(self._records))]  # fmt: skip
        is_portrait = self._portrait[order]
        groups = [order[~is_portrait], order[is_portrait]]  # Each in shuffled order.
        groups = [g[: k * b].reshape(k, b) for g, k in zip(groups, self._batches)]
        labels = np.repeat([0, 1], self._batches)  # [K] orientation of each batch
        labels = labels[np.random.default_rng((self._seed, epoch, 1)).permutation(len(labels))]
        rank = np.zeros(len(labels), np.int64)  # Batch j is batch rank[j] of its group.
        for g in (0, 1):
            rank[labels == g] = np.arange(self._batches[g])
        return np.stack([groups[g][r] for g, r in zip(labels, rank)])

    def portrait_batch(self, batch: int) -> bool:
        """Whether global batch ``batch`` (0, 1, ... over epochs) is portrait."""
        plan = self.epoch_plan(batch // self.batches_per_epoch)
        return bool(self._portrait[plan[batch % self.batches_per_epoch, 0]])

    def __getitem__(self, position: int) -> grain.RecordMetadata:
        if position < 0:
            raise IndexError(f"position {position} < 0")
        batch, row = divmod(int(position), self._b)
        epoch, j = divmod(batch, self.batches_per_epoch)
        key = int(self.epoch_plan(epoch)[j, row])
        rng = np.random.Generator(np.random.Philox(key=self._seed + int(position)))
        return grain.RecordMetadata(index=int(position), record_key=key, rng=rng)
