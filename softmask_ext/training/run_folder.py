"""One run per run folder: starting, resuming and overwriting runs, and the checks made before any work.

A run folder holds exactly one run (see :mod:`.trainer` for its files). The rules, checked before a model or any
data is loaded so that a refused command writes nothing:

* a new run needs a folder that does not exist or is empty; an existing run is continued with ``resume`` or
  replaced with ``overwrite`` (its files are removed only once every other check has passed: :func:`clear_run_folder`);
* ``resume`` needs a checkpoint to continue from; a finished run (its ``summary.json`` exists) is left as it is;
* the folder must be writable, and the disk must have room for the checkpoints kept plus the final model
  (:func:`check_free_space`).

``metrics.jsonl`` is cut back to the checkpoint a run resumes from (:func:`truncate_metrics`), dropping the lines of
the steps that will be redone and a line torn by a kill mid-write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "RunFolderError",
    "RunFinished",
    "check_run_folder",
    "clear_run_folder",
    "check_writable",
    "check_free_space",
    "read_metrics",
    "truncate_metrics",
]

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (another run is there, nothing to resume, no room, not writable)."""


class RunFinished(Exception):
    """``resume`` of a run that has already finished: nothing to do (the message says where its results are)."""


def _has_checkpoint(run_dir: Path) -> bool:
    root = run_dir / CHECKPOINTS
    return root.is_dir() and any(p.is_dir() for p in root.glob("step-*"))


def check_run_folder(
    run_dir: str | Path, resume: bool = False, overwrite: bool = False, folder_options: str = "--name or --output-dir"
) -> None:
    """Check that a run may start in ``run_dir`` as asked; writes nothing.

    Raises RunFolderError (another run is there and neither flag was given, ``resume`` without a checkpoint, both
    flags) or RunFinished (``resume`` of a finished run). ``folder_options``: the command's options that choose the
    folder, which the messages name.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: continue the run or replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} exists and is not a folder")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if (run_dir / SUMMARY).is_file():
            raise RunFinished(
                f"the run in {run_dir} has finished (see {run_dir / SUMMARY}); nothing to resume and "
                f"nothing was changed. Start another run with another {folder_options}, or replace it with "
                "--overwrite"
            )
        if not _has_checkpoint(run_dir):
            where = "it is empty" if not occupied else f"{run_dir / CHECKPOINTS} holds no checkpoint"
            raise RunFolderError(
                f"cannot resume {run_dir}: {where}. Start afresh with --overwrite (or without "
                "--resume for a new folder)"
            )
    elif occupied and not overwrite:
        raise RunFolderError(
            f"run folder {run_dir} already holds a run: continue it with --resume, replace it with "
            f"--overwrite, or choose another {folder_options}"
        )


def clear_run_folder(run_dir: str | Path) -> None:
    """Remove everything in ``run_dir`` (``--overwrite``, once every check has passed)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | Path, what: str = "output folder") -> None:
    """Raise RunFolderError unless ``path`` (or the folder it would be created in) accepts new files.

    Probes with a temporary folder that is removed at once, which also catches read-only mounts (``root`` passes
    every permission check but not those).
    """
    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise RunFolderError(f"cannot create the {what} {path}: {base} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=base))
    except OSError as e:
        raise RunFolderError(f"the {what} {path} is not writable ({base}: {e.strerror})") from None


def check_free_space(path: str | Path, needed_bytes: int, what: str) -> None:
    """Raise RunFolderError when the file system holding ``path`` has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    if free < needed_bytes:
        raise RunFolderError(
            f"no space left for this run: {what} need about {needed_bytes / 2**20:,.0f} MiB, the "
            f"disk holding {path} has {free / 2**20:,.0f} MiB free. Free some space, lower "
            "--keep-checkpoints, or choose another --output-dir"
        )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill mid-write) is left out, a bad line before it is
    an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise RunFolderError(f"{path}, line {number}: not a JSON record ({e.msg})") from None
    return records


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep the records of steps up to ``last_step`` (atomically); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(records) - len(kept)
