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


def _convs(cin: int, planes: int, stride: int) -> dict[str, tuple[int, int, int, int, int]]:
    """conv name -> (kernel size, cin, cout, stride, padding), torchvision's v1.5 layout."""
    out = 4 * planes
    convs = {
        "conv1": (1, cin, planes, 1, 0),
        "conv2": (3, planes, planes, stride, 1),
        "conv3": (1, planes, out, 1, 0),
    }
    if stride != 1 or cin != out:
        convs["downsample"] = (1, cin, out, stride, 0)
    return convs


def _weights(rng, convs) -> dict[str, dict[str, np.ndarray]]:
    """Random kernels (HWIO) and frozen-BN scale / bias per conv, variance-preserving."""
    w = {}
    for name, (k, cin, cout, _, _) in convs.items():
        w[name] = {
            "kernel": (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(
                np.float32),
            "scale": rng.uniform(0.5, 1.5, cout).astype(np.float32),
            "bias": rng.uniform(-0.1, 0.1, cout).astype(np.float32),
        }
    return w


def _conv_flops(shape_in, conv) -> float:
    k, cin, cout, stride, _ = conv
    b, h, w, _ = shape_in
    return 2.0 * b * (h // stride) * (w // stride) * cout * cin * k * k


def ours(shape, planes, stride, weights, x, dy):
    """Our block (``modeling.resnet.Bottleneck``) and its convolutions: times and outputs."""
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
    times = {"block fwd": lambda: jax.block_until_ready(fwd(params, x)),
             "block fwd+bwd": lambda: jax.block_until_ready(fwd_bwd(params, x, dy))}
    # Each conv alone, at its input shape in the block.
    rng = np.random.default_rng(1)
    for name, (k, cin, cout, s, pad) in _convs(shape[-1], planes, stride).items():
        hin = shape[1] if name in ("conv1", "conv2", "downsample") else shape[1] // stride
        win = shape[2] if name in ("conv1", "conv2", "downsample") else shape[2] // stride
        xi = jnp.asarray(rng.standard_normal((shape[0], hin, win, cin)).astype(np.float32))
        wk = jnp.asarray(weights[name]["kernel"])
        dyi = jnp.asarray(rng.standard_normal((shape[0], hin // s, win // s, cout)).astype(
            np.float32))
        f = xla_options.jit(lambda xi, wk, s=s, pad=pad: conv2d(xi, wk, s, pad))
        dx = xla_options.jit(lambda xi, wk, dyi, s=s, pad=pad: jax.vjp(
            lambda a: conv2d(a, wk, s, pad), xi)[1](dyi)[0])
        dw = xla_options.jit(lambda xi, wk, dyi, s=s, pad=pad: jax.vjp(
            lambda b: conv2d(xi, b, s, pad), wk)[1](dyi)[0])
        for part, fn, args in (("fwd", f, (xi, wk)), ("dx", dx, (xi, wk, dyi)),
                               ("dw", dw, (xi, wk, dyi))):
            jax.block_until_ready(fn(*args))
            times[f"{name} {part}"] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    return times, np.asarray(y)


def theirs(shape, planes, stride, weights, x, dy):
    """torchvision's Bottleneck with FrozenBatchNorm2d and the same weights."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.resnet import Bottleneck as TorchBottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    cin, out = shape[-1], 4 * planes
    down = None
    if stride != 1 or cin != out:
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
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    tdy = torch.from_numpy(dy.transpose(0, 3, 1, 2).copy())

    def fwd():
        with torch.no_grad():
            return block(tx)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        tx.grad = None
        y = block(tx)
        y.backward(tdy)

    y = fwd()
    times = {"block fwd": fwd, "block fwd+bwd": fwd_bwd}
    rng = np.random.default_rng(1)
    for name, (k, cin_, cout, s, pad) in _convs(cin, planes, stride).items():
        hin = shape[1] if name in ("conv1", "conv2", "downsample") else shape[1] // stride
        win = shape[2] if name in ("conv1", "conv2", "downsample") else shape[2] // stride
        xi = torch.from_numpy(rng.standard_normal((shape[0], hin, win, cin_)).astype(
            np.float32).transpose(0, 3, 1, 2).copy())
        wk = torch.from_numpy(weights[name]["kernel"].transpose(3, 2, 0, 1).copy())
        dyi = torch.from_numpy(rng.standard_normal((shape[0], hin // s, win // s, cout)).astype(
            np.float32).transpose(0, 3, 1, 2).copy())
        times[f"{name} fwd"] = lambda xi=xi, wk=wk, s=s, pad=pad: F.conv2d(xi, wk, None, s, pad)
        times[f"{name} dx"] = lambda xi=xi, wk=wk, dyi=dyi, s=s, pad=pad: (
            torch.nn.grad.conv2d_input(xi.shape, wk, dyi, s, pad))
        times[f"{name} dw"] = lambda xi=xi, wk=wk, dyi=dyi, s=s, pad=pad: (
            torch.nn.grad.conv2d_weight(xi, wk.shape, dyi, s, pad))
    return times, y.numpy().transpose(0, 2, 3, 1)


def run(names, repeats: int) -> list[dict]:
    import torch

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        shape, planes, stride = BLOCKS[name]
        rng = np.random.default_rng(0)
        convs = _convs(shape[-1], planes, stride)
        weights = _weights(rng, convs)
        x = rng.standard_normal(shape).astype(np.float32)
        out_shape = (shape[0], shape[1] // stride, shape[2] // stride, 4 * planes)
        dy = rng.standard_normal(out_shape).astype(np.float32)
        ours_t, y_ours = ours(shape, planes, stride, weights, x, dy)
        with torch.no_grad():
            theirs_t, y_theirs = theirs(shape, planes, stride, weights, x, dy)
        err = float(np.max(np.abs(y_ours - y_theirs)) / np.max(np.abs(y_theirs)))
        flops = {}
        for c, conv in convs.items():
            s_in = shape if c in ("conv1", "conv2", "downsample") else (
                shape[0], shape[1] // stride, shape[2] // stride, conv[1])
            flops[c] = _conv_flops(s_in, conv)
        block_fwd = sum(flops.values())
        times = {k: [] for k in ours_t}
        t_times = {k: [] for k in ours_t}
        for _ in range(repeats):
            for k in ours_t:
                t0 = time.perf_counter()
                ours_t[k]()
                times[k].append(time.perf_counter() - t0)
                if k.endswith(("dx", "dw")) or k == "block fwd+bwd":
                    t0 = time.perf_counter()
                    theirs_t[k]()
                    t_times[k].append(time.perf_counter() - t0)
                else:
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        theirs_t[k]()
                        t_times[k].append(time.perf_counter() - t0)
        for k in ours_t:
            part = k.split()[-1]
            conv = k.split()[0]
            if conv == "block":
                gflop = block_fwd * (1 if part == "fwd" else 3) / 1e9
            else:
                gflop = flops[conv] / 1e9
            rows.append({"block": name, "what": k, "gflop": gflop,
                         "ours_s": float(np.median(times[k])),
                         "torch_s": float(np.median(t_times[k])), "max_rel_err": err})
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
