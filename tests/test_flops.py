"""The HLO FLOP counter of ``experiments/flops.py`` on a tiny conv + matmul + loop program.

The program: a 3x3 stride-2 convolution of x [2, 8, 8, 3] to [2, 4, 4, 5], its
output flattened and multiplied by w [80, 4], then three loop iterations of a
[2, 4] @ [4, 4] product. By hand, at 2 FLOPs per multiply-add:

- convolution: 2 * (2*4*4*5 outputs) * (3*3*3 taps) = 8640;
- matmul: 2 * 2*4 * 80 = 1280; loop: 3 * 2 * 2*4 * 4 = 192.

Its gradient adds the input and kernel gradients of the convolution (8640
each, as torch counts them), the two gradients of the matmul (1280 each) and
the loop's transpose (192). torch's ``FlopCounterMode`` on the same program
gives the same integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.flops import hlo_flops

CONV, MATMUL, LOOP = 8640, 1280, 192


def _program(x, k, w):
    y = jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    z = y.reshape(y.shape[0], -1) @ w  # [2, 4]
    z = jax.lax.fori_loop(0, 3, lambda i, c: c @ jnp.eye(4) * 0.5, z)
    return jnp.sum(z**2)


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 8, 8, 3)).astype(np.float32),
            rng.normal(size=(3, 3, 3, 5)).astype(np.float32),
            rng.normal(size=(80, 4)).astype(np.float32))  # fmt: skip


def _torch_flops(x, k, w) -> int:
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)
    kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        y = torch.nn.functional.conv2d(xt, kt, stride=2, padding=1)
        z = y.permute(0, 2, 3, 1).reshape(2, -1) @ wt
        for _ in range(3):
            z = z @ torch.eye(4) * 0.5
        (z**2).sum().backward()
    return counter.get_total_flops()


def test_forward_counts_each_loop_iteration():
    count = hlo_flops(jax.jit(_program).lower(*_inputs()).compile().as_text())
    assert (count.conv, count.dot) == (CONV, MATMUL + LOOP)
    assert count.unknown_trip_counts == {} and count.uncounted_custom_calls == []


def test_gradient_counts_as_torch_does():
    inputs = _inputs()
    grad = jax.jit(jax.grad(_program, argnums=(0, 1, 2)))
    count = hlo_flops(grad.lower(*inputs).compile().as_text())
    assert count.conv == 3 * CONV  # forward, input gradient (zero-dilated), kernel gradient
    assert count.dot == 3 * MATMUL + 2 * LOOP
    assert count.total == _torch_flops(*inputs)


def test_a_loop_of_unknown_length_is_reported():
    def program(x, w):
        return jax.lax.while_loop(lambda c: c[0, 0] < 100.0, lambda c: c @ w, x)

    x, w = np.ones((2, 4), np.float32), np.full((4, 4), 2.0, np.float32)
    count = hlo_flops(jax.jit(program).lower(x, w).compile().as_text())
    assert count.dot == 2 * 2 * 4 * 4  # The body once: its trip count is data-dependent.
    assert list(count.unknown_trip_counts.values()) == [2 * 2 * 4 * 4]


def test_a_switch_counts_its_costliest_branch_or_the_one_picked():
    """Three branches: x @ w once, twice, three times ([2, 4] @ [4, 4]: 64 FLOPs each)."""

    def program(i, x, w):
        branches = [lambda x, n=n: jax.lax.fori_loop(0, n, lambda _, c: c @ w, x) for n in (1, 2, 3)]
        return jax.lax.switch(i, branches, x)

    x, w = np.ones((2, 4), np.float32), np.full((4, 4), 0.5, np.float32)
    text = jax.jit(program).lower(np.int32(0), x, w).compile().as_text()
    assert hlo_flops(text).dot == 3 * 64
    seen = []
    for i in range(3):
        assert hlo_flops(text, branch=lambda costs, i=i: seen.append(costs) or i).dot == (i + 1) * 64
    assert sorted(seen[0]) == [64, 128, 192]
