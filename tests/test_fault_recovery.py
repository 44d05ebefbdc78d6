"""Fault drills, faults survived: preemption (SIGTERM / SIGINT), kill -9 during checkpoint saves, exact
resume, a topology change, two processes, NaN losses, exceptions mid-run, and host memory over 500 steps.

All runs are the quickstart shrunk to seconds (:data:`TINY`). The in-process runs share one XLA
compilation through a persistent compilation cache (same config, same program); subprocess runs use
the same cache directory. The 8-device reference run (mesh 4×2, 20 steps) is shared by the exact-resume,
topology and two-process drills.

NaN injection: the "stop" drill uses a pathological learning rate (``train.learning_rate=1e30``), which
a user can set; the "skip" drill poisons one batch in-process (its margins set to NaN), so exactly
one known batch is non-finite.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import jaxrm.train.loop as loop
from jaxrm.cli import main
from jaxrm.data.records import DataError
from jaxrm.train.checkpoint import Checkpointer
from jaxrm.train.config import MeshConfig, load_config
from jaxrm.train.mesh import make_mesh, replicated
from jaxrm.train.run_dir import load_reward_model

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs/quickstart.yaml")
TINY = [
    "train.steps=20", "train.batch_size=16", "data.synthetic.n_train=256", "data.synthetic.n_eval=64",
    "train.eval_every=0", "train.log_every=1", "train.progress=false", "train.checkpoint_every=1000",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.head_dim=8",
]
MESH_4x2 = ["mesh.data=4", "mesh.fsdp=2"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One persistent XLA compilation cache for this module's runs, in-process and in subprocesses."""
    from jax.experimental.compilation_cache import compilation_cache

    path = tmp_path_factory.getbasetemp() / "fault-drills-xla-cache"
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(path), 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def env_for(devices: int, cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def jaxrm(*argv, devices: int, cache: Path, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxrm.cli", *argv], env=env_for(devices, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def train_in_process(*overrides: str) -> dict:
    return loop.train(load_config(QUICKSTART, [*TINY, *overrides]))


def losses(run: Path) -> dict[int, float]:
    """Train loss by step from ``metrics.jsonl``; a step logged twice would fail the drills."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if line["split"] == "train"]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {line["step"]: line["loss"] for line in lines if line["split"] == "train"}


def final_params(run: Path) -> list[np.ndarray]:
    model, _, _ = load_reward_model(run, checkpoint="latest")
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def latest_step(run: Path) -> int | None:
    checkpointer = Checkpointer(run / "checkpoints", asynchronous=False)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-3000:]}"
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                    if line.strip()):
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {run} after {timeout} s")


class _InterruptAt(loop.MetricsLog):
    """Logs as usual, then delivers a real SIGINT to this process right after step ``STEP`` is logged."""

    STEP = 10

    def write(self, step, split, metrics):
        super().write(step, split, metrics)
        if split == "train" and step == self.STEP:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def straight(cache_dir, tmp_path_factory):
    """20 steps without interruption, 8 devices on a 4 × 2 (data × fsdp) mesh."""
    run = tmp_path_factory.mktemp("straight")
    summary = train_in_process(*MESH_4x2, f"output_dir={run}")
    assert summary["step"] == 20
    return run


@pytest.fixture(scope="module")
def interrupted(cache_dir, tmp_path_factory):
    """The same run stopped by SIGINT after step 10; returns (run, a copy of it as it was at step 10)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "MetricsLog", _InterruptAt)
        result = train_in_process(*MESH_4x2, f"output_dir={run}")
    assert result == {"stopped_by": "SIGINT", "step": 10, "output_dir": str(run)}
    assert latest_step(run) == 10
    at_step_10 = run.parent / "at-step-10"
    shutil.copytree(run, at_step_10)
    return run, at_step_10


@pytest.mark.slow
def test_exact_resume_gives_the_same_losses_and_parameters(straight, interrupted):
    run, _ = interrupted
    summary = train_in_process(*MESH_4x2, f"output_dir={run}")
    assert summary["resumed_from"] == 10 and summary["step"] == 20
    expected, got = losses(straight), losses(run)
    assert sorted(got) == list(range(1, 21))
    assert got == expected, "resuming must reproduce every step's loss bit for bit"
    for a, b in zip(final_params(straight), final_params(run), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_checkpoint_restores_bit_exact_on_fewer_devices(interrupted):
    """Saved on 8 devices (parameters split over fsdp = 2), restored onto 8, 2 and 1 device(s)."""
    _, at_step_10 = interrupted
    checkpointer = Checkpointer(at_step_10 / "checkpoints", asynchronous=False)
    saved = checkpointer.manager.item_metadata(10)["state"]
    restored = []
    for devices in (8, 2, 1):
        mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:devices])
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh)),
                              saved)
        state, data_state = checkpointer.restore(10, target)
        assert {device.id for leaf in jax.tree.leaves(state) for device in leaf.devices()} == {
            device.id for device in jax.devices()[:devices]}
        assert data_state["iterator"]["next_index"] == 10
        restored.append([np.asarray(leaf) for leaf in jax.tree.leaves(state)])
    checkpointer.close()
    for other in restored[1:]:
        for a, b in zip(restored[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 1])
def test_topology_change_resumes_with_the_same_losses(devices, straight, interrupted, cache_dir, tmp_path):
    _, at_step_10 = interrupted
    run = tmp_path / "run"
    shutil.copytree(at_step_10, run)
    code, err = finish(jaxrm("train", str(run / "config.yaml"), f"output_dir={run}", "mesh.data=-1", "mesh.fsdp=1",
                             devices=devices, cache=cache_dir))
    assert code == 0, err[-3000:]
    assert f"resuming {run} from step 10" in err
    expected, got = losses(straight), losses(run)
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(11, 21)], [expected[s] for s in range(11, 21)], rtol=2e-5)
    for a, b in zip(final_params(straight), final_params(run), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(straight, cache_dir, tmp_path):
    run = tmp_path / "run"
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        jaxrm("train", QUICKSTART, *TINY, *MESH_4x2, f"output_dir={run}", "mesh.distributed=true",
              f"mesh.coordinator_address={address}", "mesh.num_processes=2", f"mesh.process_id={index}",
              devices=4, cache=cache_dir)
        for index in range(2)
    ]
    results = [finish(process) for process in processes]
    for code, err in results:
        assert code == 0, err[-3000:]
    expected, got = losses(straight), losses(run)
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [expected[s] for s in range(1, 21)], rtol=2e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 20


@pytest.mark.slow
def test_sigterm_then_kill9_then_resume(cache_dir, tmp_path):
    """SIGTERM finishes the step, checkpoints and exits 0; kill -9 during saves loses nothing complete;
    the next ``jaxrm train`` resumes from the last complete checkpoint and finishes the run."""
    run, steps = tmp_path / "run", 120
    first = jaxrm("train", QUICKSTART, *TINY, f"train.steps={steps}", f"output_dir={run}", devices=2, cache=cache_dir)
    wait_for_step(run, 2, first)
    first.send_signal(signal.SIGTERM)
    code, err = finish(first)
    assert code == 0, err[-3000:]
    assert "SIGTERM received: stopped after step" in err, err[-3000:]
    stopped_at = int(err.split("stopped after step ")[1].split(",")[0])
    assert 2 <= stopped_at < steps and latest_step(run) == stopped_at
    resume = err.split("Resume with: ")[1].split()
    assert resume[:2] == ["jaxrm", "train"] and Path(resume[2]) == run / "config.yaml"

    rng = random.Random(0)
    for _ in range(2):
        before = latest_step(run)
        killed = jaxrm("train", resume[2], "train.checkpoint_every=1", devices=2, cache=cache_dir)
        wait_for_step(run, before + 3, killed)
        time.sleep(rng.uniform(0.0, 0.2))
        killed.kill()
        killed.communicate()
        # Saves are asynchronous and one waits for the previous: once step before + 3 ran, the save of
        # step before + 1 had completed, whatever the kill interrupted.
        assert latest_step(run) > before, "completed checkpoints survive kill -9"
    # An incomplete save as Orbax leaves it (a temporary directory, never renamed) must be ignored.
    planted = run / "checkpoints" / f"{steps - 1}.orbax-checkpoint-tmp-1234567890"
    (planted / "state").mkdir(parents=True)
    (planted / "state" / "garbage").write_bytes(os.urandom(64))
    last_complete = latest_step(run)
    assert last_complete < steps - 1

    code, err = finish(jaxrm("train", resume[2], "train.checkpoint_every=1000", devices=2, cache=cache_dir))
    assert code == 0, err[-3000:]
    assert f"from step {last_complete}" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == steps and summary["resumed_from"] == last_complete
    assert all(np.isfinite(leaf).all() for leaf in final_params(run))
    assert set(losses_logged_from(run)) == set(range(1, steps + 1))


def losses_logged_from(run: Path) -> list[int]:
    """Steps with a logged train loss (a step killed after logging but before its checkpoint is redone)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if line["split"] == "train"]


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_a_clean_checkpoint(cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", QUICKSTART, *TINY, "train.learning_rate=1e30", "train.warmup_steps=0",
                 f"output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "non-finite loss or gradient" in err and "on batch" in err and "synthetic:train[" in err, err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert latest_step(run) == step
    assert all(np.isfinite(leaf).all() for leaf in final_params(run)), "a checkpoint must never hold NaN"


@pytest.mark.slow
def test_nan_batch_is_skipped_and_counted(cache_dir, tmp_path, capsys, monkeypatch):
    poisoned_call, calls = 4, []

    def poisoned(local, mesh):
        calls.append(1)
        if len(calls) == poisoned_call:
            local = local.replace(margin=np.full_like(local.margin, np.nan))
        return global_batch(local, mesh)

    global_batch = loop.global_batch
    monkeypatch.setattr(loop, "global_batch", poisoned)
    run = tmp_path / "run"
    summary = train_in_process(*MESH_4x2, "train.on_nonfinite=skip", f"output_dir={run}")
    err = capsys.readouterr().err
    assert f"step {poisoned_call}: non-finite loss or gradient" in err and f"on batch {poisoned_call - 1}" in err
    assert "batch skipped" in err
    assert summary["step"] == 20 and summary["skipped_steps"] == 1
    assert summary["data"]["train"]["skipped"] == 16
    assert all(np.isfinite(leaf).all() for leaf in final_params(run))


@pytest.mark.slow
def test_exception_mid_run_leaves_a_restorable_checkpoint(cache_dir, tmp_path, monkeypatch):
    failing_call, calls = 6, []

    def late_data_error(local, mesh):
        calls.append(1)
        if len(calls) == failing_call:
            raise DataError("late.jsonl:7: a record turned out unreadable")
        return global_batch(local, mesh)

    global_batch = loop.global_batch
    monkeypatch.setattr(loop, "global_batch", late_data_error)
    run = tmp_path / "run"
    with pytest.raises(DataError, match="late.jsonl:7"):
        train_in_process(*MESH_4x2, f"output_dir={run}")
    assert latest_step(run) == failing_call - 1
    checkpointer = Checkpointer(run / "checkpoints", asynchronous=False)
    data_state = checkpointer.manager.restore(failing_call - 1).data
    checkpointer.close()
    assert data_state["iterator"]["next_index"] == failing_call - 1, "the data position goes with the saved step"
    assert all(np.isfinite(leaf).all() for leaf in final_params(run))


_MEMORY_PROBE = """
import json, resource, sys
import jaxrm.train.loop as loop
from jaxrm.train.config import load_config

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

samples = {}
class Probe(loop.MetricsLog):
    def write(self, step, split, metrics):
        super().write(step, split, metrics)
        if split == "train":
            samples[step] = rss_mib()

loop.MetricsLog = Probe
loop.train(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps({"rss_mib": samples, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_host_memory_stays_flat_over_500_steps(cache_dir, tmp_path):
    overrides = ["train.steps=500", "train.batch_size=16", "train.log_every=50", "train.progress=false",
                 "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.head_dim=8",
                 "data.synthetic.n_train=2000", "data.synthetic.n_eval=200", f"output_dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, QUICKSTART, *overrides], env=env_for(2, cache_dir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rss = {int(step): value for step, value in report["rss_mib"].items()}
    warm, end = rss[100], rss[500]
    print(f"host RSS: {warm:.1f} MiB after warm-up (step 100), {end:.1f} MiB at step 500, "
          f"peak {report['max_rss_mib']:.1f} MiB; by step: {rss}")
    assert end - warm < 64, f"host memory grew by {end - warm:.1f} MiB over 400 steps: {rss}"
