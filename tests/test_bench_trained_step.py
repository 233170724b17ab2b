"""``experiments/bench_trained_step.py``: its variants and its one-line errors.

Nothing is compiled or timed here: every case stops before the checkpoint is read.
"""

from __future__ import annotations

import pathlib

import pytest

from experiments import bench_trained_step
from experiments.tiny import get_config

TINY = str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "tiny.py")


def test_override_sets_typed_model_fields():
    config = bench_trained_step._override(get_config(), "mask_head_prefixes=1,box_nms_thresh=0.6")
    assert config.model.mask_head_prefixes == 1
    assert config.model.box_nms_thresh == 0.6
    untouched = bench_trained_step._override(get_config(), "")
    assert untouched.model.to_dict() == get_config().model.to_dict()


@pytest.mark.parametrize(
    "variant, message",
    [
        ("no_such_field=1", "unknown model config field 'no_such_field'"),
        ("mask_head_dim=abc", "mask_head_dim='abc' is not a Python literal"),
        ("mask_head_dim='wide'", "mask_head_dim=\"'wide'\":"),
    ],
)
def test_bad_variant_is_one_line(variant, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", TINY, variant])
    text = str(exc.value)
    assert text.startswith(f"error: variant {variant!r}: ") and message in text
    assert "\n" not in text


def test_workdir_without_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", TINY])
    assert str(exc.value) == (
        f"error: --workdir {tmp_path}: no train checkpoint in {tmp_path / 'checkpoints'}"
    )


def test_missing_config_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_trained_step.main(["--workdir", str(tmp_path), "--config", str(tmp_path / "x.py")])
    assert str(exc.value) == f"error: --config {tmp_path / 'x.py'}: no such file"


def test_trace_breakdown_sums_a_jitted_gradient_by_part(tmp_path):
    # A real trace of a small jitted gradient: its instructions carry op_names under
    # "MaskRCNN.box_head" (forward) and "transpose(jvp(...))" (backward), and the
    # breakdown must find both among the trace's events.
    import jax
    import jax.numpy as jnp

    from experiments import trace_breakdown

    def loss(w, x):
        with jax.named_scope("MaskRCNN.box_head"):
            y = jnp.tanh(x @ w)
        return jnp.sum(jnp.sort(y, axis=0) ** 2)

    step = jax.jit(jax.grad(loss))
    w, x = jnp.ones((64, 64)) / 64, jnp.arange(256 * 64.0).reshape(256, 64) / 1e4
    compiled = step.lower(w, x).compile()
    names = trace_breakdown.hlo_op_names(compiled.as_text())
    assert any("MaskRCNN.box_head" in n for n in names.values())
    jax.block_until_ready(compiled(w, x))
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(2):
        jax.block_until_ready(compiled(w, x))
    jax.profiler.stop_trace()
    per_instruction, per_part = trace_breakdown.summarize(str(tmp_path), names, steps=2)
    assert per_instruction and set(per_instruction) <= set(names)
    assert {d for _, d in per_part} == {"forward", "backward"}
    assert ("box_head", "backward") in per_part
    text = trace_breakdown.format_summary(per_instruction, per_part, names)
    assert text.startswith("traced instructions: ")


def test_part_of_names_module_and_direction():
    from experiments.trace_breakdown import part_of

    assert part_of(
        "jit(train_step)/transpose(jvp(MaskRCNN.losses))/MaskRCNN.mask_head/roi_mask_head/x"
    ) == ("mask_head", "backward")
    assert part_of("jit(train_step)/jvp(MaskRCNN.losses)/MaskRCNN.proposals/sort") == (
        "proposals", "forward",
    )
    assert part_of("jit(train_step)/jvp(MaskRCNN.losses)/vmap(jit(argsort))/sort") == (
        "argsort/sort", "forward",
    )
