"""Where and with what a result was produced: the record that benchmark results, evaluations and training summaries
carry, so that a number can be traced to its command, code and machine."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import ops

__all__ = ["cpu_model", "environment", "git_commit"]

# The source checkout the package runs from (an installed package has no .git above it: no commit is recorded).
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: str | os.PathLike = SOURCE_ROOT) -> str | None:
    """HEAD of the git checkout at ``root``, with ``-dirty`` when tracked files differ from it; None outside one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None, command: Sequence[str] | None = None) -> dict:
    """Command line (``command``, else this process's), git commit, date, machine, CPU model and count, GPU name
    (when ``device`` is a GPU, or not given and one is present), torch/CUDA/Python versions, torch's thread count,
    whether the compiled extension loaded and the CPU kernels' instruction set."""
    device = torch.device(device) if device is not None else None
    on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
    return {
        "command": shlex.join(command if command is not None else [Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "extension_loaded": ops.EXTENSION_LOADED,
        "cpu_isa": ops.cpu_isa(),
    }
