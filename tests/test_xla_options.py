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


def _gradient_conv_labels(fn, *args) -> list[str]:
    """dim_labels of every convolution in the compiled ``fn``."""
    text = xla_options.jit(fn).lower(*args).compile().as_text()
    return [line.split("dim_labels=")[1].split(",")[0]
            for line in text.splitlines() if " convolution(" in line]  # fmt: skip


def test_conv_with_canonical_grads_matches_conv2d_and_stays_canonical_in_a_branch():
    """``layers.conv2d_canonical_grads`` against ``layers.conv2d`` (stride 1, padding 1
    and 0): value, input and kernel gradients for a fixed cotangent, within the float32
    reordering bound of the test above (n = 9 * Cin for the value and the input
    gradient, B * H' * W' for the kernel gradient). Inside a ``lax.switch`` branch its
    gradient convolutions keep the form XLA:CPU's fast kernel takes (``b01f_01io->b01f``),
    where ``conv2d``'s kernel gradient does not: that premise is checked too."""
    from maskrcnn_jax.modeling.layers import conv2d, conv2d_canonical_grads

    rng = np.random.default_rng(1)
    b, h, w, ci, co = 6, 10, 9, 8, 5
    x = jnp.asarray(rng.standard_normal((b, h, w, ci)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, ci, co)), jnp.float32)
    m = lambda a: float(jnp.abs(a).max())
    for pad in (1, 0):
        hh, ww = h + 2 * pad - 2, w + 2 * pad - 2
        c = jnp.asarray(rng.standard_normal((b, hh, ww, co)), jnp.float32)

        def grads(conv):
            def f(x, k, c):
                y, vjp = jax.vjp(conv, x, k)
                return (y, *vjp(c))

            return f

        ref = jax.jit(grads(lambda x, k: conv2d(x, k, 1, pad)))(x, k, c)
        got = jax.jit(grads(lambda x, k: conv2d_canonical_grads(x, k, pad)))(x, k, c)
        for name, r, g, n, ab in zip(
            ("value", "input grad", "kernel grad"), ref, got, (9 * ci, 9 * co, b * hh * ww),
            (m(x) * m(k), m(c) * m(k), m(x) * m(c)),
        ):  # fmt: skip
            assert g.shape == r.shape, name
            np.testing.assert_allclose(g, r, atol=(n - 1) * 2**-24 * n * ab, rtol=0,
                                       err_msg=f"pad {pad} {name}")  # fmt: skip

    def in_branch(conv):
        def f(x, k):
            def both_grads(k):  # all three convolutions: value, input and kernel gradients
                gk, gx = jax.grad(lambda k, x: jnp.sum(conv(x, k) ** 2), (0, 1))(k, x)
                return gk + jnp.sum(gx)

            index = (jnp.sum(x) > -1e30).astype(jnp.int32)
            return lax.switch(index, [jnp.zeros_like, both_grads], k)

        return f

    canonical = _gradient_conv_labels(in_branch(lambda x, k: conv2d_canonical_grads(x, k, 1)), x, k)
    plain = _gradient_conv_labels(in_branch(lambda x, k: conv2d(x, k, 1, 1)), x, k)
    assert len(canonical) == 3 and set(canonical) == {"b01f_01io->b01f"}, canonical
    assert set(plain) != {"b01f_01io->b01f"}, plain
