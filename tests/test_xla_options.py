"""xla_options: which compiler options each backend gets, and that they keep the values."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maskrcnn_jax import xla_options


def test_cpu_gets_the_options_and_other_backends_none(monkeypatch):
    monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
    assert xla_options.compiler_options("gpu") == {}
    assert xla_options.compiler_options("tpu") == {}
    xla_options.compiler_options("cpu")["extra"] = "1"  # a fresh dict each call
    assert "extra" not in xla_options.CPU_OPTIONS


def test_env_switch_passes_none(monkeypatch):
    monkeypatch.setenv(xla_options.DEFAULTS_ENV, "1")
    assert xla_options.compiler_options("cpu") == {}
    monkeypatch.setenv(xla_options.DEFAULTS_ENV, "0")
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS


def test_conv_and_its_gradients_match_the_default_compilation():
    """A mask-head-like 3x3 conv ([32, 14, 14, 64], the size at which XLA's default
    fuses it into YNNPACK): under the options no YNN fusion is left, and the value and
    both gradients (for a fixed cotangent) match plain ``jax.jit``. Only the summation
    order may differ. An element summing n products, each at most a * b in size, moves
    by at most (n - 1) * 2^-24 * n * a * b when its float32 sum is reordered: n is
    9 * 64 = 576 for the value and the input gradient, 32 * 14 * 14 = 6272 for the
    weight gradient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 14, 14, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((32, 14, 14, 64)), jnp.float32)

    def f(x, w, c):
        conv = lambda x, w: lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(c))

    compiled = xla_options.jit(f).lower(x, w, c).compile()
    assert "__ynn_fusion" not in compiled.as_text()
    ref = jax.jit(f)(x, w, c)
    got = compiled(x, w, c)
    m = lambda a: float(jnp.abs(a).max())
    for name, r, g, n, ab in zip(
        ("value", "input grad", "weight grad"), ref, got, (576, 576, 6272),
        (m(x) * m(w), m(c) * m(w), m(x) * m(c)),
    ):  # fmt: skip
        np.testing.assert_allclose(g, r, atol=(n - 1) * 2**-24 * n * ab, rtol=0, err_msg=name)
