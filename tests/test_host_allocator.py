"""maskrcnn_jax.host_allocator: large blocks from the heap, kept after free (glibc only).

Each case runs in a fresh interpreter, so that the options never reach the test session.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from maskrcnn_jax import host_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In the child: is a 64 MB block (above glibc's largest mmap threshold, 32 MB) taken
# from the heap, moving the program break, and does the break stay after the free?
_PROBE = """
import ctypes, json, sys
from maskrcnn_jax import host_allocator
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = host_allocator.keep_freed_blocks() if sys.argv[1] == "1" else False
before = libc.sbrk(0)
p = libc.malloc(64 << 20)
grown = libc.sbrk(0) - before
libc.free(p)
kept = libc.sbrk(0) - before
print(json.dumps({"applied": applied, "grown": grown, "kept": kept}))
"""


def _probe(apply: bool, **env) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if apply else "0"],
        env=dict(os.environ, PYTHONPATH=ROOT, **env), capture_output=True, text=True,
        check=True, timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# Decided independently of host_allocator._glibc, so that a detection that wrongly finds
# no glibc fails here (the options would not be applied) instead of skipping the tests.
needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc")


@needs_glibc
def test_large_blocks_come_from_the_heap_and_stay():
    default = _probe(False)
    assert not default["applied"] and default["grown"] < 64 << 20  # mmap'd, not the heap
    tuned = _probe(True)
    assert tuned["applied"]
    assert tuned["grown"] >= 64 << 20  # from the heap
    assert tuned["kept"] >= 64 << 20  # not trimmed on free: the next step reuses it


@needs_glibc
def test_defaults_env_skips_it():
    skipped = _probe(True, **{host_allocator.DEFAULTS_ENV: "1"})
    assert not skipped["applied"] and skipped["grown"] < 64 << 20
