"""Train-step time of model-config variants at a trained checkpoint, interleaved.

Run (from the repository root, after `make train` has written runs/shapes):
  .venv/bin/python -m experiments.bench_trained_step --workdir runs/shapes \
      mask_head_prefixes=4 mask_head_prefixes=1 mask_head_prefixes=1,mask_rois_per_image=8

A model at initialisation is not a model in training: its RPN proposes noise, so few
RoIs are positive and the mask head runs on few of them. After a few hundred steps
every image fills its mask slots. This restores the latest checkpoint of ``--workdir``
(trained with ``--config``), takes ``--batches`` batches of that config's training
data, compiles the train step once per variant (``model`` config overrides,
``key=value`` joined by commas; each variant must keep the checkpoint's parameter
shapes), then times the variants in turn on the same batches, ``--rounds`` times,
the state not donated so that every step starts from the checkpoint. Prints each
variant's compile time, min and median seconds per step, and the mask head's
positives per image on those batches (mean and max).

``--trace DIR`` then traces ``--trace_steps`` steps of each variant with
``jax.profiler`` (into ``DIR/<variant number>``) and prints where they went:
milliseconds a step per model part, forward and backward, and the costliest HLO
instructions with the JAX code they came from (``experiments/trace_breakdown.py``;
XLA's own convolutions are not trace events, so the parts sum to less than the step).
"""

from __future__ import annotations

import argparse
import ast
import os
import time

import numpy as np


def _override(config, variant: str):
    """``config`` with the ``model`` overrides of ``variant`` (``a=1,b=2``; ``""``: none)."""
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        if key not in config.model:
            raise SystemExit(f"error: variant {variant!r}: unknown model config field {key!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(
                f"error: variant {variant!r}: {key}={value!r} is not a Python literal"
            ) from None
        try:
            config.model[key] = parsed
        except TypeError as e:  # ml_collections keeps each field's type
            raise SystemExit(f"error: variant {variant!r}: {key}={value!r}: {e}") from None
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a work dir with train checkpoints")
    parser.add_argument("--config", default="experiments/shapes.py")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trace", default="", help="trace each variant's steps into DIR")
    parser.add_argument("--trace_steps", type=int, default=3)
    parser.add_argument("variants", nargs="*", default=["mask_head_prefixes=4", ""])
    args = parser.parse_args(argv)

    import jax

    from experiments.ablations import load_config
    from experiments.bench_train import mask_positives
    from maskrcnn_jax import checkpoint as ckpt
    from maskrcnn_jax import data, optim, sharding, train, xla_options
    from maskrcnn_jax.modeling import MaskRCNN, init_model

    try:
        base = load_config(args.config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    configs = {v: _override(load_config(args.config), v) for v in args.variants}
    checkpoints = os.path.join(os.path.abspath(args.workdir), ckpt.CHECKPOINT_SUBDIR)
    if not os.path.isdir(checkpoints):
        raise SystemExit(f"error: --workdir {args.workdir}: no train checkpoint in {checkpoints}")
    manager = ckpt.make_manager(checkpoints, item_names=ckpt.TRAIN_ITEMS)
    step = manager.latest_step()
    if step is None:
        raise SystemExit(f"error: --workdir {args.workdir}: no train checkpoint in {checkpoints}")
    mesh = sharding.make_mesh(None)
    with data.make_train_iterator(
        train._data_config(base, os.path.abspath(args.workdir)), seed=base.seed + 1,
        batch_size=base.train.batch_size,
    ) as batches:  # fmt: skip
        batch_list = []
        for _ in range(args.batches):
            local = next(batches)
            batch_list.append(
                sharding.global_batch({k: local[k] for k in train.TRAIN_KEYS}, mesh)
            )
    canvas = tuple(batch_list[0]["image"].shape[1:3])

    runs = {}
    for variant in args.variants:
        config = configs[variant]
        model = MaskRCNN(config.model)
        k_init, k_train = jax.random.split(jax.random.key(config.seed))
        shapes = jax.eval_shape(lambda k: init_model(config.model, k, canvas), k_init)
        optimizer = optim.make_optimizer(config, shapes["params"])
        abstract = jax.eval_shape(
            lambda v, k: train.create_train_state(v, optimizer, k), shapes, k_train
        )
        state_sharding = sharding.tree_replicated(abstract, mesh)
        try:
            state, _ = ckpt.restore_train_state(manager, step, abstract, state_sharding)
        except (ValueError, TypeError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise SystemExit(
                f"error: variant {variant!r}: the step-{step} checkpoint in {checkpoints} does "
                f"not fit its model (a variant must keep the parameter shapes): {first}"
            ) from None
        step_fn = xla_options.jit(
            train.make_train_step(model, config, optimizer),
            in_shardings=(state_sharding, sharding.data_sharded(mesh)),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
        )
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch_list[0]).compile()
        compile_s = time.perf_counter() - t0
        per_image = np.concatenate([
            mask_positives(model, state.variables(), b, jax.random.key(1)) for b in batch_list
        ])  # fmt: skip
        runs[variant] = (compiled, state, compile_s, per_image)

    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            compiled, state = runs[variant][:2]
            for b in batch_list:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(state, b)[1])
                times[variant].append(time.perf_counter() - t0)

    print(f"checkpoint step {step} of {args.workdir}; {args.batches} batches x {args.rounds} "
          f"rounds; cpu cores={os.cpu_count()}")  # fmt: skip
    print(f"{'variant':48} {'compile s':>9} {'min s':>6} {'median s':>8} {'positives':>10}")
    for variant in args.variants:
        _, _, compile_s, per_image = runs[variant]
        t = times[variant]
        print(
            f"{variant or '(the config)':48} {compile_s:9.1f} {min(t):6.2f} "
            f"{float(np.median(t)):8.2f} {per_image.mean():5.1f}/{per_image.max():<4d}"
        )
    if args.trace:
        _trace(args.trace, args.trace_steps, args.variants, runs, batch_list)


def _trace(trace_dir: str, steps: int, variants, runs, batch_list) -> None:
    """Traces ``steps`` steps of each variant and prints their breakdown."""
    import jax

    from experiments import trace_breakdown

    for number, variant in enumerate(variants):
        compiled, state = runs[variant][:2]
        names = trace_breakdown.hlo_op_names(compiled.as_text())
        directory = os.path.join(trace_dir, str(number))
        jax.profiler.start_trace(directory)
        for i in range(steps):
            jax.block_until_ready(compiled(state, batch_list[i % len(batch_list)])[1])
        jax.profiler.stop_trace()
        per_instruction, per_part = trace_breakdown.summarize(directory, names, steps)
        print(f"\n== {variant or '(the config)'}: {steps} traced steps in {directory}")
        print(trace_breakdown.format_summary(per_instruction, per_part, names))


if __name__ == "__main__":
    main()
