"""Training metrics on disk: ``metrics.jsonl`` plus optional TensorBoard events."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """A scalar array as a Python number, any other array as a nested list."""
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
    """``WORKDIR/metrics.jsonl`` (one JSON object per line) plus TensorBoard events.

    TensorBoard files go to ``WORKDIR/tensorboard`` when ``tensorboardX`` is
    installed. A disabled writer (processes other than the first) writes
    nothing.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        # Held open for the whole run, closed by close().
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard files are optional
            self._tb = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        """Appends ``{"step": step, **values}``; numbers also go to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Closes the files; safe to call twice."""
        if self.enabled:
            self.enabled = False
            self._file.close()
            if self._tb is not None:
                self._tb.close()
