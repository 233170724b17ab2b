"""Host memory allocation for CPU training: keep large freed blocks in the process.

XLA:CPU allocates each step's temporary buffers with the C library's malloc.
glibc serves blocks above its mmap threshold (at most 32 MB) with fresh
``mmap`` pages and returns them to the kernel on ``free``, so every step
faults in and zeroes its large buffers again. In the ``make train`` recipe's
step the largest is the box head's RoIAlign tap cotangent, 205 MB at width 64;
writing it took 116 ms of a 1.0 s step in a trace. With mmap off and a high
trim threshold, freed blocks stay in the heap and the next step reuses them:
the step was 4-5% faster (median of 10 interleaved pairs in one process, AMD
EPYC Zen 3, 2 cores); on the R50 step (18-22 s) no effect showed either way.
The cost is that the process's resident memory stays at its peak, as it does
with torch's or JAX's own caching allocators on GPUs.

The training CLI on the CPU calls :func:`keep_freed_blocks` once at start-up,
and ``experiments/bench_train.py``'s side of ours does too, so that it times
what training runs; ``MASKRCNN_JAX_MALLOC_DEFAULTS=1`` skips it. It does
nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os

DEFAULTS_ENV = "MASKRCNN_JAX_MALLOC_DEFAULTS"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

# Free memory at the heap's top beyond this goes back to the kernel: the largest value
# mallopt takes (an int), 2 GB, above the shapes step's working set.
TRIM_THRESHOLD_BYTES = 2**31 - 1
# Extra heap grown per sbrk, so that a step's many large blocks take few system calls.
TOP_PAD_BYTES = 64 << 20


def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, if it is glibc (no library search)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded, libc's among them
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError off glibc)
    except (OSError, TypeError, AttributeError):  # TypeError: Windows takes no None
        return None
    return libc


def keep_freed_blocks() -> bool:
    """Serves large allocations from the heap and keeps freed ones for reuse.

    Affects allocations made after the call, process-wide. Returns whether the
    options were set: False off glibc or with ``MASKRCNN_JAX_MALLOC_DEFAULTS=1``.
    """
    if os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    ok &= libc.mallopt(_M_TOP_PAD, TOP_PAD_BYTES) == 1
    return bool(ok)
