"""The orbax recipe as a program: a run killed with SIGKILL resumes from its latest checkpoint and
ends with the bits of a run never interrupted; the last N and the best are kept; the best
exports to one ``mx.save`` file, and such a file seeds a new run."""

import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

import metoryx as mx

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_digits_resumable.py"
# 60 steps, a checkpoint every 10: steps 0, 10, ..., 60.
RUN = [sys.executable, str(EXAMPLE), "--steps", "60", "--save-every", "10"]


def run_example(*args):
    done = subprocess.run([*RUN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def restore(directory, step):
    """The state saved at ``step``, as orbax reads it back (no target: the test compares bits)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        return manager.restore(step, args=ocp.args.StandardRestore())


def steps_and_metrics(directory):
    """Each finished step's test accuracy. A step whose directory a kill left without its
    metadata (written last) has no metrics and is left out."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        found = {step: manager.metrics(step) for step in manager.all_steps()}
    return {step: metrics["test_accuracy"] for step, metrics in found.items() if metrics}


def assert_same_bits(actual, desired):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    leaves = zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired), strict=True)
    for (path, a), d in leaves:
        a, d = np.asarray(a), np.asarray(d)
        assert (a.dtype, a.shape, a.tobytes()) == (d.dtype, d.shape, d.tobytes()), path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run never interrupted, keeping every checkpoint, its best exported with mx.save."""
    directory = tmp_path_factory.mktemp("reference")
    exported = directory / "best.safetensors"
    stdout = run_example("--dir", directory / "steps", "--keep", 100, "--export", exported)
    assert f"to {exported}" in stdout
    return directory / "steps", exported


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_latest_checkpoint_bit_for_bit(tmp_path, reference):
    ref_dir, _ = reference
    run_dir = tmp_path / "run"
    with subprocess.Popen(
        [*RUN, "--dir", str(run_dir), "--keep", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as killed:
        assert killed.stdout is not None
        for line in killed.stdout:
            # Killed as it starts saving step 30, with the earlier saves possibly still writing.
            if line.startswith("step 30: saving"):
                killed.send_signal(signal.SIGKILL)
                break
    assert killed.returncode == -signal.SIGKILL

    # Each save first waits for the one before, so step 10 is on disk; 20 and 30 may be.
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(run_dir, options=options) as manager:
        latest = manager.latest_step()  # what the example resumes from
    assert latest in (10, 20, 30)
    assert_same_bits(restore(run_dir, latest), restore(ref_dir, latest))

    stdout = run_example("--dir", run_dir, "--keep", 2)
    assert f"resumed from step {latest}" in stdout
    assert_same_bits(restore(run_dir, 60), restore(ref_dir, 60))

    # The latest two and the best by test accuracy (ties go to the later step) are kept.
    accuracies = steps_and_metrics(ref_dir)
    best = max(accuracies, key=lambda step: (accuracies[step], step))
    assert set(steps_and_metrics(run_dir)) == {50, 60, best}
    assert f"best step {best}:" in stdout


@pytest.mark.slow
def test_the_best_checkpoint_exports_to_mx_save_and_seeds_a_new_run(tmp_path, reference):
    ref_dir, exported = reference
    accuracies = steps_and_metrics(ref_dir)
    best = max(accuracies, key=lambda step: (accuracies[step], step))
    best_variables = restore(ref_dir, best)["variables"]
    assert_same_bits(mx.load(exported), best_variables)
    # One plain safetensors file, tensors named by their paths.
    plain = safetensors.numpy.load_file(exported)
    assert (
        plain["params/conv1/kernel"].tobytes()
        == np.asarray(best_variables["params"]["conv1"]["kernel"]).tobytes()
    )

    # A new run from the file: its first checkpoint holds the file's variables and a fresh
    # optimizer state.
    run_example("--dir", tmp_path / "seeded", "--steps", 10, "--init-from", exported)
    seeded = restore(tmp_path / "seeded", 0)
    assert_same_bits(seeded["variables"], best_variables)
    # Adam starts from zero moments and a zero step count.
    assert not any(np.asarray(leaf).any() for leaf in jax.tree.leaves(seeded["opt_state"]))
