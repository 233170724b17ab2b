"""Bad input: one error type, and a counter for the skips a config asks for.

Dataset preparation either raises :class:`DatasetError` at the first bad image
or annotation (a one-line message naming the file and the annotation id), or,
with ``skip_bad_annotations=True``, skips it and counts it in a
:class:`SkipCounter` whose summary is logged at the end and stored with the
prepared dataset, so nothing is dropped silently.
"""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A bad image or annotation in a dataset's source files."""


class SkipCounter:
    """Skips a bad item (counted by reason) or raises, as configured.

    Attributes:
      skip: whether bad items are skipped (True) or raise DatasetError (False).
      counts: reason -> number of skipped items.
    """

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: collections.Counter[str] = collections.Counter()
        self._examples: dict[str, str] = {}

    def bad(self, reason: str, message: str) -> None:
        """Reports a bad item: raises, or counts it under ``reason``.

        Args:
          reason: short key, e.g. ``'missing_image'``.
          message: one line naming the file and the annotation or image id.

        Raises:
          DatasetError: when not skipping.
        """
        if not self.skip:
            raise DatasetError(message)
        self.counts[reason] += 1
        self._examples.setdefault(reason, message)
        logger.debug("skipped: %s", message)

    @property
    def total(self) -> int:
        """Number of skipped items, all reasons together."""
        return sum(self.counts.values())

    def summary(self, what: str) -> str:
        """One line: the counts per reason and the first example of each."""
        if not self.counts:
            return f"{what}: nothing skipped"
        parts = [f"{k}={v} (first: {self._examples[k]})" for k, v in sorted(self.counts.items())]
        return f"{what}: skipped {self.total} bad items: " + "; ".join(parts)
