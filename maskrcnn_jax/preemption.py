"""SIGTERM (a Cloud TPU / cluster preemption) as a flag a training loop checks."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class Preemption:
    """Context manager: while inside, SIGTERM sets ``requested`` instead of killing.

    The previous handler is restored on exit. Outside the main thread (where
    signal handlers cannot be installed) it does nothing and ``requested``
    stays False.
    """

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint and stopping")
            self.requested = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
