"""XLA compiler options for this library's jitted functions, per backend.

One owner for the options every ``jax.jit`` of the model passes (the train
step, ``Predictor``, ``ExportedPredictor``, the benchmarks): call
:func:`jit` where you would call ``jax.jit``.

On the CPU, XLA (jaxlib 0.10-0.11) hands convolutions to YNNPACK fusions by
default. Their weight gradients are slow at the shapes of this model: a 3x3
conv over the mask head's [256, 14, 14, 64] RoI features takes 0.55-0.74 s
for its weight gradient, and 0.08-0.10 s forward, where XLA's own (Eigen)
convolution takes 0.05-0.06 s for each (AMD EPYC, 2 cores; PROFILE_shapes.md).
``xla_cpu_experimental_ynn_fusion_type=""`` (no YNN fusion types) keeps the
convolutions and matrix products on XLA's own kernels. The results are the
same up to float summation order. GPU and TPU compilations get no options.

``MASKRCNN_JAX_XLA_DEFAULTS=1`` passes no options on any backend, for
measuring XLA's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
DEFAULTS_ENV = "MASKRCNN_JAX_XLA_DEFAULTS"


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options for ``backend`` (default: ``jax.default_backend()``); a fresh dict."""
    if os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
        return {}
    backend = backend or jax.default_backend()
    return dict(CPU_OPTIONS) if backend == "cpu" else {}


def jit(fun: Callable, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` for the default backend."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
