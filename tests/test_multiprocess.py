"""Real multi-process JAX on one machine: CPU processes joined through a coordinator on 127.0.0.1.

Each run starts ``python -m maskrcnn_jax.train`` processes with ``subprocess`` on a free
port, ``--xla_force_host_platform_device_count`` CPU devices each and gloo collectives
between them: the same runtime as a pod slice or a GPU cluster. Every process has a
timeout and is killed in a ``finally``, so no test can hang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Bounds each run (a compile of the tiny model on a loaded 2-core box took 4.5 min); a
# run that takes longer fails the test instead of hanging it.
RUN_TIMEOUT_S = 900
# --distributed_timeout: joining, heartbeat and shutdown bound (seconds).
DISTRIBUTED_TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, data_dir, *, processes, devices, steps, log_dir, extra=()):
    """Starts the processes of one run; returns the Popen objects (stdout+stderr to files).

    The runs of a module share a persistent compilation cache next to ``data_dir``: the
    2-process runs after the first load their train step instead of compiling it.
    """
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        # The session's flags (conftest.py's cheaper code generation) with this run's devices,
        # and XLA's own fusion emitters: with the legacy ones (conftest.py), 1 process x 4
        # devices and 2 processes x 2 devices did not compute the same per-device terms (the
        # stem kernel differed by 2.4e-6 after 3 steps, 4e-4 relative), which
        # test_two_processes_match_one_process assumes; see also MASKRCNN_JAX_XLA_DEFAULTS.
        XLA_FLAGS=" ".join(
            [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_force_host_platform_device_count",
                                  "--xla_cpu_use_fusion_emitters"))]
            + [f"--xla_force_host_platform_device_count={devices}"]
        ),
        MASKRCNN_JAX_DATA_DIR=data_dir,
        JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(data_dir), "jax_cache"),
        # XLA's default CPU compilation (no xla_options): with the options' own (Eigen)
        # convolutions, 1 process x 4 devices and 2 processes x 2 devices did not compute
        # the same per-device terms (the stem's GroupNorm bias, a near-cancelling sum,
        # differed by 4% relative after 3 steps), which test_two_processes_match_one_process
        # assumes. The data, sharding and gradient sum it checks are the same either way.
        MASKRCNN_JAX_XLA_DEFAULTS="1",
    )
    base = [
        sys.executable, "-m", "maskrcnn_jax.train",
        "--config", os.path.join(ROOT, "experiments", "tiny.py"),
        "--workdir", workdir,
        f"--config.train.steps={steps}",
        "--config.checkpoint_every=2",
        *extra,
    ]
    port = _free_port()
    procs = []
    os.makedirs(log_dir, exist_ok=True)
    for i in range(processes):
        flags = []
        if processes > 1:
            flags = [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={processes}",
                f"--process_id={i}",
                f"--distributed_timeout={DISTRIBUTED_TIMEOUT_S}",
            ]
        log = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # noqa: SIM115
        procs.append(subprocess.Popen(base + flags, env=env, stdout=log, stderr=log, cwd=ROOT))
        log.close()  # The child holds its own copy.
    return procs


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _logs(log_dir) -> str:
    out = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            out.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
    return "\n".join(out)


def _run(workdir, data_dir, *, processes, devices, steps, log_dir) -> None:
    """One run to completion; every process must exit 0 within RUN_TIMEOUT_S."""
    procs = _start(
        workdir, data_dir, processes=processes, devices=devices, steps=steps, log_dir=log_dir
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"run did not finish in {RUN_TIMEOUT_S} s\n{_logs(log_dir)}")
    finally:
        _kill(procs)
    codes = [p.returncode for p in procs]
    assert codes == [0] * processes, f"exit codes {codes}\n{_logs(log_dir)}"


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _has_step(workdir, step) -> bool:
    """Whether metrics.jsonl has ``step``'s loss (read while being written: a torn last
    line counts as not yet written)."""
    try:
        return step in _losses(workdir)
    except json.JSONDecodeError:
        return False


def _params(workdir, step):
    variables, _ = ckpt.load_model(os.path.join(workdir, ckpt.CHECKPOINT_SUBDIR, str(step)))
    return {k: np.asarray(v) for k, v in _flat(variables)}


def _flat(tree):
    import jax

    return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x 4 devices and 2 processes x 2 devices, 3 steps of experiments/tiny.py.

    Both checkpoint at step 2 and 3 (``checkpoint_every=2``). The data is prepared once,
    by the first run, into a directory both share.
    """
    base = tmp_path_factory.mktemp("multiprocess")
    data_dir = str(base / "data")
    one, two = str(base / "one"), str(base / "two")
    _run(one, data_dir, processes=1, devices=4, steps=3, log_dir=str(base / "logs_one"))
    _run(two, data_dir, processes=2, devices=2, steps=3, log_dir=str(base / "logs_two"))
    return base, data_dir, one, two


def test_two_processes_match_one_process(runs):
    """Same global batches, so the same losses and parameters up to the gradient sum's order.

    The 4 devices compute the same per-device terms in both runs (2 images each); only
    the cross-device sum (in-process all-reduce vs gloo between processes) may add its 4
    partials in another order, ~4 * 6e-8 relative, carried through 3 steps. A different
    batch (other images or order) changes the losses by far more than 1e-3.
    """
    _, _, one, two = runs
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    np.testing.assert_allclose([l2[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=1e-3)
    p1, p2 = _params(one, 3), _params(two, 3)
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Each process wrote its own iterator state; only process 0 wrote metrics.
    states = sorted(
        f for f in os.listdir(os.path.join(two, "checkpoints", "3", "data_state"))
        if f.endswith(".json")
    )
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]
    with open(os.path.join(two, "checkpoints", "3", "data_state", states[0])) as f0:
        with open(os.path.join(two, "checkpoints", "3", "data_state", states[1])) as f1:
            assert f0.read() != f1.read()  # Different positions: not process 0's for all.


def _wait_for(condition, procs, log_dir, what: str) -> None:
    """Polls ``condition()`` every second until it holds; fails if a process exits first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in {RUN_TIMEOUT_S} s\n{_logs(log_dir)}"
        assert all(p.poll() is None for p in procs), f"{what}: exited early\n{_logs(log_dir)}"
        time.sleep(1)


@pytest.fixture(scope="module")
def resumed_then_killed(runs):
    """Two processes resume the 2-process run from step 2; process 1 is killed after step 3.

    The work dir is put back in the state both processes leave when killed right after
    the step-2 checkpoint (step 3's checkpoint and metrics removed), then restarted
    with no step limit and a checkpoint every step (all kept). Once step 3's checkpoint
    is committed and its metrics written, process 1 gets SIGKILL mid-training, and
    process 0 must exit on its own. One run serves both tests below: starting two
    processes costs a minute or more here. The learning rate does not depend on the
    step limit (``experiments/tiny.py``: warm-up 2, decay at 1000), so steps 1-3 are
    those of a 3-step run.

    Returns:
      (work dir, process 0's exit code, seconds it took to exit after the kill, logs).
    """
    base, data_dir, _, two = runs
    resumed = str(base / "resumed")
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("tensorboard"))
    shutil.rmtree(os.path.join(resumed, "checkpoints", "3"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        rows = [line for line in f if json.loads(line)["step"] <= 2]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(rows)
    log_dir = str(base / "logs_resumed")
    procs = _start(
        resumed, data_dir, processes=2, devices=2, steps=10_000, log_dir=log_dir,
        extra=["--config.checkpoint_every=1", "--config.keep_checkpoints=10000"],
    )
    try:
        # Orbax renames a step's temporary directory to its number once committed.
        _wait_for(
            lambda: os.path.isdir(os.path.join(resumed, "checkpoints", "3"))
            and _has_step(resumed, 3),
            procs, log_dir, "step 3's checkpoint and metrics",
        )
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        # Heartbeat timeout, plus the coordination service's polling and a loaded box.
        bound = 3 * DISTRIBUTED_TIMEOUT_S + 60
        try:
            code = procs[0].wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 0 still running {bound} s after process 1 died\n{_logs(log_dir)}")
        return resumed, code, time.monotonic() - killed, _logs(log_dir)
    finally:
        _kill(procs)


def test_resume_of_two_processes_is_exact(runs, resumed_then_killed):
    """Resuming from step 2's checkpoint reproduces step 3 bit for bit."""
    two = runs[3]
    resumed = resumed_then_killed[0]
    assert _losses(resumed)[3] == _losses(two)[3]
    p_two, p_resumed = _params(two, 3), _params(resumed, 3)
    for k in p_two:
        np.testing.assert_array_equal(p_resumed[k], p_two[k], err_msg=k)


def test_a_dying_process_does_not_hang_the_other(resumed_then_killed):
    """SIGKILL process 1 mid-training: process 0 exits non-zero within the heartbeat timeout."""
    _, code, waited, logs = resumed_then_killed
    assert code != 0, logs
    print(f"process 0 exited with {code} {waited:.0f} s after process 1 was killed")


def _cli(*flags: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m maskrcnn_jax.train`` on experiments/tiny.py with ``flags``, bounded."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    cmd = [
        sys.executable, "-m", "maskrcnn_jax.train",
        "--config", os.path.join(ROOT, "experiments", "tiny.py"), *flags,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_process_id_out_of_range_is_one_line(tmp_path):
    port = _free_port()
    r = _cli(
        f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", "--process_id=2", timeout=300,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "error: --process_id=2 is not in 0..1 (--num_processes=2)", r.stderr


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
    """Process 1 waits for a coordinator nobody opened: an error after --distributed_timeout."""
    port = _free_port()  # Closed again: nothing listens there.
    r = _cli(
        f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", "--process_id=1", "--distributed_timeout=5", timeout=300,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"error: --coordinator_address=127.0.0.1:{port}: no coordinator reachable "
                    "within --distributed_timeout=5 s"), r.stderr
