"""layers.conv2d's CPU forms against XLA's plain convolution: value and both gradients.

``conv2d`` computes a 1x1 kernel as a matrix product and, on the CPU, a strided
convolution's gradients as a sum of stride-1 convolutions over the input's phases
(``strided_conv2d_by_phases``). Both are the same products summed in another order.
An element that sums n products, each at most a * b in size, moves by at most
(n - 1) * 2^-24 * n * a * b when its float32 sum is reordered: n is k * k * Cin for
the value, k * k * Cout for the input gradient and B * H' * W' for the kernel gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from maskrcnn_jax.modeling import layers


def _lax_conv(x, k, stride, pad):
    return lax.conv_general_dilated(
        x, k, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip


def _value_and_grads(conv):
    def f(x, k, c):
        y, vjp = jax.vjp(conv, x, k)
        return (y, *vjp(c))

    return jax.jit(f)


@pytest.mark.parametrize(
    "ksize,stride,pad,hw",
    [
        (3, 2, 1, (11, 8)),  # ResNet's strided 3x3, odd and even sides
        (7, 2, 3, (13, 10)),  # the stem
        (1, 2, 0, (9, 12)),  # the strided 1x1 downsample: a product of every 2nd pixel
        (1, 1, 0, (5, 7)),  # 1x1: a matrix product
        (3, 1, 1, (6, 5)),  # XLA's convolution as it is
        (3, 3, 0, (10, 11)),  # stride 3, no padding: phases of unequal tap counts
    ],
)
def test_conv2d_matches_lax_conv_with_gradients(ksize, stride, pad, hw):
    rng = np.random.default_rng(ksize * 10 + stride)
    b, ci, co = 2, 6, 5
    x = jnp.asarray(rng.standard_normal((b, *hw, ci)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((ksize, ksize, ci, co)), jnp.float32)
    ref = _value_and_grads(lambda x, k: _lax_conv(x, k, stride, pad))
    y = _lax_conv(x, k, stride, pad)
    c = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    want = ref(x, k, c)
    got = _value_and_grads(lambda x, k: layers.conv2d(x, k, stride, pad))(x, k, c)
    m = lambda a: float(jnp.abs(a).max())
    ns = (ksize * ksize * ci, ksize * ksize * co, b * y.shape[1] * y.shape[2])
    bounds = (m(x) * m(k), m(c) * m(k), m(x) * m(c))
    for name, w, g, n, ab in zip(("value", "input grad", "kernel grad"), want, got, ns, bounds):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(g, w, atol=(n - 1) * 2**-24 * n * ab, rtol=0, err_msg=name)


@pytest.mark.parametrize("kh,kw,out_hw", [(3, 3, (5, 5)), (3, 2, (5, 6))])
def test_phases_sum_to_the_strided_convolution(kh, kw, out_hw):
    """The decomposition itself (used for the gradients), square and not: a wrong phase
    offset or kernel slice moves the value by O(1), far above the reordering bound."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 9, 10, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kh, kw, 4, 3)), jnp.float32)
    want = _lax_conv(x, k, 2, 1)
    got = jax.jit(lambda x, k: layers.strided_conv2d_by_phases(x, k, 2, 1))(x, k)
    assert got.shape == want.shape == (1, *out_hw, 3)
    n = kh * kw * 4
    bound = (n - 1) * 2**-24 * n * float(jnp.abs(x).max() * jnp.abs(k).max())
    np.testing.assert_allclose(got, want, atol=bound, rtol=0)
