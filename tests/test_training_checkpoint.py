"""Atomic checkpoints: a writer killed at random moments never leaves a corrupt ``latest``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softmask_ext.training import CorruptCheckpointError, latest_checkpoint, verify_checkpoint, write_checkpoint

# Writes checkpoints 1, 2, ... forever; each holds a 4 MB payload derived from its step and a nested file.
WRITER = r"""
import json, random, sys
from pathlib import Path
from softmask_ext.training import write_checkpoint, latest_checkpoint

root = Path(sys.argv[1])
latest = latest_checkpoint(root)
step = 0 if latest is None else json.loads((latest / "state.json").read_text())["step"]
def payload(step):
    return random.Random(step).randbytes(4 << 20)
while True:
    step += 1
    def write(d, step=step):
        (d / "weights.bin").write_bytes(payload(step))
        (d / "sub").mkdir()
        (d / "sub" / "state.json").write_text(json.dumps({"step": step}))
        (d / "state.json").write_text(json.dumps({"step": step}))
    write_checkpoint(root, step, write, keep=2)
    print(step, flush=True)
"""


def _check_consistent(root: Path) -> int:
    path = latest_checkpoint(root)
    assert path is not None
    step = verify_checkpoint(path)
    assert json.loads((path / "state.json").read_text())["step"] == step
    assert json.loads((path / "sub" / "state.json").read_text())["step"] == step
    assert (path / "weights.bin").read_bytes() == random.Random(step).randbytes(4 << 20)
    return step


def test_killed_writer_never_leaves_a_corrupt_latest(tmp_path):
    root = tmp_path / "checkpoints"
    rng = random.Random(0)
    kills_mid_save, last_step = 0, 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        # Wait for at least one completed save of this process, then kill at a random moment.
        assert proc.stdout.readline().strip(), "the writer produced no checkpoint"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills_mid_save += any(p.name.startswith(".tmp-") for p in root.iterdir())
        step = _check_consistent(root)
        assert step > last_step
        last_step = step
        assert len([p for p in root.iterdir() if p.name.startswith("step-")]) <= 3
    assert kills_mid_save >= 2, "the kills should land during saves for this test to mean something"


def test_corruption_is_detected(tmp_path):
    def write(d):
        (d / "a.bin").write_bytes(b"x" * 1000)

    path = write_checkpoint(tmp_path, 5, write)
    assert latest_checkpoint(tmp_path) == path and verify_checkpoint(path) == 5
    with open(path / "a.bin", "r+b") as f:
        f.write(b"y")
    with pytest.raises(CorruptCheckpointError, match="a.bin"):
        latest_checkpoint(tmp_path)
    os.remove(path / "manifest.json")
    with pytest.raises(CorruptCheckpointError, match="manifest"):
        verify_checkpoint(path)


def test_keep_prunes_old_checkpoints_and_stale_temporaries(tmp_path):
    stale = tmp_path / ".tmp-step-00000009-123"
    stale.mkdir(parents=True)
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, lambda d: (d / "f").write_text("x"), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(ValueError, match="keep"):
        write_checkpoint(tmp_path, 4, lambda d: None, keep=0)
