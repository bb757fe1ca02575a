"""Crash-safe checkpoint directories.

Layout under a run's ``checkpoints/`` folder::

    step-00000100/      one complete checkpoint (any files; ``manifest.json`` lists their sizes and SHA-256)
    step-00000200/
    latest              text file naming the newest complete checkpoint directory

Protocol: the files are written into a hidden temporary directory, each file is fsynced, then the manifest, then
the directory; the directory is renamed to its final name (atomic on POSIX), the parent is fsynced, and only then is
``latest`` replaced (write ``latest.tmp``, fsync, ``os.replace``, fsync the parent). A process killed at any moment
therefore leaves ``latest`` pointing to a complete, verified checkpoint (or no ``latest`` before the first one);
leftover temporary directories are removed by the next save. A checkpoint damaged later (a disk fault, a file
edited or truncated by hand) fails verification, and :func:`latest_good_checkpoint` falls back to the newest older
one that passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CorruptCheckpointError",
    "write_checkpoint",
    "latest_checkpoint",
    "latest_good_checkpoint",
    "verify_checkpoint",
]

MANIFEST = "manifest.json"
LATEST = "latest"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory does not match its manifest."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def write_checkpoint(root: str | Path, step: int, write_files: Callable[[Path], None], keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and point ``latest`` at it.

    write_files: called with an empty directory; writes the checkpoint's files into it (subfolders allowed).
    keep:        number of newest checkpoints to keep (older ones are deleted after ``latest`` moves).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = checkpoint_name(step)
    final = root / name
    current = _read_latest_name(root)
    if current == name and final.is_dir():
        return final  # this exact step is already the latest complete checkpoint
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    write_files(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    for p in files:
        _fsync_path(p)
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    _fsync_path(tmp / MANIFEST)
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_path(d)
    if final.exists():  # a checkpoint of this step that ``latest`` does not point to (an older, abandoned run)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    pointer = root / f"{LATEST}.tmp"
    pointer.write_text(name + "\n")
    _fsync_path(pointer)
    os.replace(pointer, root / LATEST)
    _fsync_path(root)
    for old in sorted(root.glob(f"{_PREFIX}*"))[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def verify_checkpoint(path: str | Path) -> int:
    """Check every file of a checkpoint against its manifest; return its step. Raises CorruptCheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: missing or unreadable {MANIFEST} ({e})") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CorruptCheckpointError(f"{path}: {MANIFEST} lacks its step or file list")
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CorruptCheckpointError(f"{path}: file {rel} is missing or does not match the manifest")
    return int(manifest["step"])


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to, verified; None when no checkpoint was ever completed."""
    root = Path(root)
    name = _read_latest_name(root)
    if name is None:
        return None
    path = root / name
    verify_checkpoint(path)
    return path


def latest_good_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under ``root`` that passes verification, and why each newer one was passed over.

    Returns ``(None, reasons)`` when none passes (or none was ever completed).
    """
    root = Path(root)
    # Directories appear complete (renamed into place), so one newer than ``latest`` (killed before the pointer
    # moved) is as good as the one ``latest`` names.
    names = sorted((p.name for p in root.glob(f"{_PREFIX}*") if p.is_dir()), reverse=True)
    skipped = []
    for name in names:
        try:
            verify_checkpoint(root / name)
        except CorruptCheckpointError as e:
            skipped.append(str(e))
            continue
        return root / name, skipped
    return None, skipped
