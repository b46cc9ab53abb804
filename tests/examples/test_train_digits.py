"""The flagship example runs end to end and writes what it promises under --out."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "train_digits.py"


@pytest.mark.slow
def test_train_digits_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "digits"
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(out), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "test accuracy:" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["train_loss"]) == 3
    # Three epochs are far from the full run's 98%, and already far above chance (10%).
    assert metrics["test_accuracy"] > 0.8
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(out / "variables.npz")
    assert saved["params/conv1/kernel"].shape == (3, 3, 1, 32)
    assert saved["params/fc1/kernel"].shape == (2 * 2 * 64, 128)
