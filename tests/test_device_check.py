"""experiments/device_check.py: the --smoke run, the missing-wheels message, no data stack.

The smoke run is the check's own code path at tiny shapes on the CPU (Pallas
in interpret mode), run once per session in a subprocess as a user would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "device_check.py")
DATA_STACK = ("tensorflow_datasets", "tensorflow", "grain", "array_record", "pycocotools")


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    # One CPU device, as on a user's machine; the session's other XLA flags (the tests'
    # cheaper code generation, conftest.py) stay.
    flags = env.pop("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "report.json"
    p = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--output", str(out)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def _numbers(x, path=""):
    """Every (path, number) leaf of a JSON value."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


def test_smoke_report_has_every_section_with_finite_numbers(smoke_report):
    report, stdout = smoke_report
    sections = report["sections"]
    assert list(sections) == list("abfcdeg")
    for name, res in sections.items():
        assert "error" not in res and "skipped" not in res, (name, res)
        numbers = list(_numbers(res))
        assert numbers, name
        bad = [p for p, v in numbers if not math.isfinite(v)]
        assert not bad, (name, bad)
        assert "error" not in json.dumps(res), name  # torchvision workers included
    assert report["meta"]["data_stack_modules_loaded"] == []
    assert "| impl | dtype | out |" in stdout  # markdown rows for the README


def test_smoke_errors_within_tolerance(smoke_report):
    s = smoke_report[0]["sections"]
    b = s["b"]["rows"]
    assert {(r["impl"], r["dtype"]) for r in b} == {
        (i, d) for i in ("pallas", "einsum") for d in ("float32", "bfloat16")
    }
    for r in b:
        assert r["fwd_err_over_tol"] <= 1 and r["grad_err_over_tol"] <= 1, r
        assert r["ok"]
    f = s["f"]["rows"]
    assert [r["impl"] for r in f] == ["pallas", "einsum"]
    for r in f:
        assert r["detections"] > 0 and r["valid_equal"] and r["labels_equal"], r
        assert r["box_max_err_px"] <= 1e-3, r
    for row in s["c"]["rows"]:
        for impl in ("reference", "pallas", "einsum"):
            assert row[impl]["fwd_s"] > 0 and row[impl]["fb_mem_mb"] > 0
    d = s["d"]
    assert set(d["impls"]) == {"pallas"}  # the smoke's one (reference, pallas on a GPU)
    assert d["instances"] >= 8
    for r in d["impls"].values():
        assert r["img_per_s"] > 0 and r["step_mem_mb"] > 0
    assert d["torchvision"]["img_per_s"] > 0
    assert [r["batch"] for r in s["e"]["rows"]] == [1]
    assert all(r["torchvision"]["img_per_s"] > 0 for r in s["e"]["rows"])
    assert [r["n"] for r in s["g"]["rows"]] == [64, 64, 128, 128]


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )


def test_missing_ml_collections_is_one_line_and_exit_2():
    code = (
        "import sys, runpy\n"
        "sys.modules['ml_collections'] = None  # import raises ImportError\n"
        f"sys.argv = [{SCRIPT!r}, '--output', '/dev/null']\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    )
    p = _run_blocked(code)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("device_check: missing packages: ml-collections;")
    assert "make device-wheels" in lines[0] or ".whl/" in lines[0]
    assert "--no-index --no-deps" in lines[0]
    assert p.stdout == ""


def test_importing_the_check_imports_no_data_stack():
    code = (
        "import sys\n"
        "import experiments.device_check as dc\n"
        "config = dc.load_experiment_config('coco_r50_fpn_1x')\n"
        "print(tuple(config.dataset.image_size), config.model.num_classes)\n"
        f"print(sorted(m for m in {DATA_STACK!r} if m in sys.modules))\n"
        "print('maskrcnn_jax.data' in sys.modules)\n"
    )
    p = _run_blocked(code)
    assert p.returncode == 0, p.stderr[-2000:]
    canvas, loaded, data_pkg = p.stdout.strip().splitlines()[-3:]
    assert canvas == "(1344, 1344) 81"
    assert loaded == "[]"
    assert data_pkg == "False"  # the stand-in is gone afterwards
