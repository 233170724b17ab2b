"""One R50 bottleneck block, forward and backward: ours (XLA) against torch, same weights.

Issue 15 item 5 keeps the R50 train step's remaining gap in this micro-benchmark.
Run (from the repository root):
  .venv/bin/python -m experiments.bench_block [--blocks layer2_0,layer3_1] [--repeats 5]

Each block is the one of ``maskrcnn_resnet50_fpn``'s trunk at a COCO-size batch
(2 images of 800x1088), with frozen batch norm (folded into the kernel on our
side, ``FrozenBatchNorm2d`` on torch's) and random weights shared by both:

- ``layer1_1``: [2, 200, 272, 256] -> 64 -> 256 (stride 1; frozen in training);
- ``layer2_0``: [2, 200, 272, 256] -> 128 -> 512 (stride 2 on the 3x3, with the
  strided 1x1 downsample);
- ``layer3_1``: [2, 50, 68, 1024] -> 256 -> 1024 (stride 1);
- ``layer4_0``: [2, 50, 68, 1024] -> 512 -> 2048 (stride 2, downsample).

Reported, median of ``--repeats`` (interleaved, both sides single-process on
all cores): the block's forward, and its forward + backward (the gradients
of the parameters and of the input under a fixed random cotangent, as in
training); then each convolution of the block alone: forward, input
gradient, weight gradient. Ours are ``jax.vjp`` pieces under
``xla_options.jit`` (the train step's compiler options); torch's are
``F.conv2d`` and ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` (aten's
``convolution_backward`` with one output, as autograd calls it). Outputs are
checked to agree before timing. GFLOP counts 2 per multiply-add.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# name -> (input [B, H, W, C], planes, stride)
BLOCKS = {
    "layer1_1": ((2, 200, 272, 256), 64, 1),
    "layer2_0": ((2, 200, 272, 256), 128, 2),
    "layer3_1": ((2, 50, 68, 1024), 256, 1),
    "layer4_0": ((2, 50, 68, 1024), 512, 2),
}


def _convs(shape, planes: int, stride: int) -> dict[str, tuple[int, ...]]:
    """conv name -> (kernel size, cin, cout, stride, padding, input height, input width),
    torchvision's v1.5 layout, for a block whose input is ``shape`` [B, H, W, Cin]."""
    _, h, w, cin = shape
    out = 4 * planes
    convs = {
        "conv1": (1, cin, planes, 1, 0, h, w),
        "conv2": (3, planes, planes, stride, 1, h, w),
        "conv3": (1, planes, out, 1, 0, h // stride, w // stride),
    }
    if stride != 1 or cin != out:
        convs["downsample"] = (1, cin, out, stride, 0, h, w)
    return convs


def _weights(rng, convs) -> dict[str, dict[str, np.ndarray]]:
    """Random kernels (HWIO) and frozen-BN scale / bias per conv, variance-preserving."""
    w = {}
    for name, (k, cin, cout, *_) in convs.items():
        w[name] = {
            "kernel": (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(
                np.float32),
            "scale": rng.uniform(0.5, 1.5, cout).astype(np.float32),
            "bias": rng.uniform(-0.1, 0.1, cout).astype(np.float32),
        }
    return w


def _conv_inputs(rng, batch: int, convs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """conv name -> (input [B, H, W, Cin], output cotangent [B, H', W', Cout]), NHWC."""
    inputs = {}
    for name, (_, cin, cout, s, _, h, w) in convs.items():
        x = rng.standard_normal((batch, h, w, cin)).astype(np.float32)
        dy = rng.standard_normal((batch, h // s, w // s, cout)).astype(np.float32)
        inputs[name] = x, dy
    return inputs


def _conv_flops(batch: int, conv) -> float:
    k, cin, cout, stride, _, h, w = conv
    return 2.0 * batch * (h // stride) * (w // stride) * cout * cin * k * k


def ours(planes, stride, convs, weights, conv_inputs, x, dy):
    """Our block (``modeling.resnet.Bottleneck``) and its convolutions: calls and output."""
    from maskrcnn_jax import xla_options
    from maskrcnn_jax.modeling.layers import conv2d
    from maskrcnn_jax.modeling.resnet import Bottleneck

    block = Bottleneck(planes, stride, norm="frozen_bn")
    params = {n: {"kernel": jnp.asarray(v["kernel"])} for n, v in weights.items()}
    consts = {n: {"scale": jnp.asarray(v["scale"]), "bias": jnp.asarray(v["bias"])}
              for n, v in weights.items()}
    x, dy = jnp.asarray(x), jnp.asarray(dy)

    def apply(p, x):
        return block.apply({"params": p, "constants": consts}, x)

    fwd = xla_options.jit(apply)

    @xla_options.jit
    def fwd_bwd(p, x, dy):
        y, vjp = jax.vjp(apply, p, x)
        return y, vjp(dy)

    y = jax.block_until_ready(fwd(params, x))
    jax.block_until_ready(fwd_bwd(params, x, dy))
    calls = {"block fwd": lambda: jax.block_until_ready(fwd(params, x)),
             "block fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(params, x, dy))}
    # Each conv alone, at its input shape in the block.
    for name, (_, _, _, s, pad, _, _) in convs.items():
        xi, dyi = (jnp.asarray(a) for a in conv_inputs[name])
        wk = jnp.asarray(weights[name]["kernel"])
        f = xla_options.jit(lambda xi, wk, s=s, pad=pad: conv2d(xi, wk, s, pad))
        dx = xla_options.jit(lambda xi, wk, dyi, s=s, pad=pad: jax.vjp(
            lambda a: conv2d(a, wk, s, pad), xi)[1](dyi)[0])
        dw = xla_options.jit(lambda xi, wk, dyi, s=s, pad=pad: jax.vjp(
            lambda b: conv2d(xi, b, s, pad), wk)[1](dyi)[0])
        for part, fn, args in (("fwd", f, (xi, wk)), ("dx", dx, (xi, wk, dyi)),
                               ("dw", dw, (xi, wk, dyi))):
            jax.block_until_ready(fn(*args))
            calls[f"{name} {part}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    return calls, np.asarray(y)


def theirs(planes, stride, convs, weights, conv_inputs, x, dy):
    """torchvision's Bottleneck with FrozenBatchNorm2d and the same weights and inputs."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.resnet import Bottleneck as TorchBottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    cin, out = x.shape[-1], 4 * planes
    down = None
    if "downsample" in convs:
        down = torch.nn.Sequential(torch.nn.Conv2d(cin, out, 1, stride, bias=False),
                                   FrozenBatchNorm2d(out))
    block = TorchBottleneck(cin, planes, stride, down, norm_layer=FrozenBatchNorm2d)
    pairs = {"conv1": (block.conv1, block.bn1), "conv2": (block.conv2, block.bn2),
             "conv3": (block.conv3, block.bn3)}
    if down is not None:
        pairs["downsample"] = (down[0], down[1])
    with torch.no_grad():
        for name, (conv, bn) in pairs.items():
            conv.weight.copy_(torch.from_numpy(weights[name]["kernel"].transpose(3, 2, 0, 1)))
            bn.weight.copy_(torch.from_numpy(weights[name]["scale"]))
            bn.bias.copy_(torch.from_numpy(weights[name]["bias"]))
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)  # scale = weight / sqrt(var + eps) = weight
    tx = nchw(x).requires_grad_(True)
    tdy = nchw(dy)

    def fwd():
        with torch.no_grad():
            return block(tx)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        tx.grad = None
        y = block(tx)
        y.backward(tdy)

    y = fwd()
    calls = {"block fwd": fwd, "block fwd+bwd": fwd_bwd}
    # The convs alone: their inputs need no gradient, so autograd records nothing.
    for name, (_, _, _, s, pad, _, _) in convs.items():
        xi, dyi = (nchw(a) for a in conv_inputs[name])
        wk = torch.from_numpy(weights[name]["kernel"].transpose(3, 2, 0, 1).copy())
        calls[f"{name} fwd"] = lambda xi=xi, wk=wk, s=s, pad=pad: F.conv2d(xi, wk, None, s, pad)
        calls[f"{name} dx"] = lambda xi=xi, wk=wk, dyi=dyi, s=s, pad=pad: (
            torch.nn.grad.conv2d_input(xi.shape, wk, dyi, s, pad))
        calls[f"{name} dw"] = lambda xi=xi, wk=wk, dyi=dyi, s=s, pad=pad: (
            torch.nn.grad.conv2d_weight(xi, wk.shape, dyi, s, pad))
    return calls, y.numpy().transpose(0, 2, 3, 1)


def run(names, repeats: int) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        shape, planes, stride = BLOCKS[name]
        rng = np.random.default_rng(0)
        convs = _convs(shape, planes, stride)
        weights = _weights(rng, convs)
        x = rng.standard_normal(shape).astype(np.float32)
        out_shape = (shape[0], shape[1] // stride, shape[2] // stride, 4 * planes)
        dy = rng.standard_normal(out_shape).astype(np.float32)
        conv_inputs = _conv_inputs(rng, shape[0], convs)
        sides = {side: fn(planes, stride, convs, weights, conv_inputs, x, dy)
                 for side, fn in (("ours", ours), ("torch", theirs))}
        y_ours, y_theirs = sides["ours"][1], sides["torch"][1]
        err = float(np.max(np.abs(y_ours - y_theirs)) / np.max(np.abs(y_theirs)))
        flops = {c: _conv_flops(shape[0], conv) for c, conv in convs.items()}
        times = {(side, k): [] for side in sides for k in sides["ours"][0]}
        for _ in range(repeats):
            for k in sides["ours"][0]:
                for side, (calls, _) in sides.items():
                    t0 = time.perf_counter()
                    calls[k]()
                    times[side, k].append(time.perf_counter() - t0)
        for k in sides["ours"][0]:
            conv, part = k.split()
            if conv == "block":  # forward + backward: the forward's FLOPs three times
                gflop = sum(flops.values()) * (1 if part == "fwd" else 3) / 1e9
            else:
                gflop = flops[conv] / 1e9
            rows.append({"block": name, "what": k, "gflop": gflop,
                         "ours_s": float(np.median(times["ours", k])),
                         "torch_s": float(np.median(times["torch", k])), "max_rel_err": err})
    return rows


def print_rows(rows) -> None:
    print("block     what                 GFLOP  ours ms  torch ms  ratio  ours GFLOP/s  "
          "torch GFLOP/s")
    for r in rows:
        print(f"{r['block']:<9} {r['what']:<18} {r['gflop']:7.1f} {r['ours_s'] * 1e3:8.0f} "
              f"{r['torch_s'] * 1e3:9.0f} {r['ours_s'] / r['torch_s']:6.2f} "
              f"{r['gflop'] / r['ours_s']:13.0f} {r['gflop'] / r['torch_s']:14.0f}")
    errs = {r["block"]: r["max_rel_err"] for r in rows}
    print("block output max |ours - torch| / max |torch|:",
          {k: f"{v:.1e}" for k, v in errs.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="layer2_0,layer3_1",
                   help=f"comma-separated, of {','.join(BLOCKS)}")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    names = args.blocks.split(",")
    bad = [n for n in names if n not in BLOCKS]
    if bad:
        raise SystemExit(f"bench_block: unknown --blocks {','.join(bad)}; choose from "
                         f"{','.join(BLOCKS)}")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores")
    print_rows(run(names, args.repeats))


if __name__ == "__main__":
    main()
