"""Cheap integrity checks of a checkpoint's weight files, made before the (slow) load.

A safetensors file is an 8-byte little-endian header length ``N``, a JSON header of ``N`` bytes whose tensors give
``data_offsets`` into the data section, then the data section. A truncated or overwritten file breaks one of these
and is reported here naming the file, instead of deep inside the loader. Flipped bytes inside the tensor data cannot
be seen without checksums (safetensors has none); the run checkpoints of :mod:`softmask_ext.training.checkpoint`
carry SHA-256 sums for that.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

__all__ = ["CorruptWeightsError", "check_safetensors_file", "check_weight_files"]

_MAX_HEADER = 100 << 20  # the safetensors format's own cap on the header size


class CorruptWeightsError(ValueError):
    """A weight file that is truncated or not a safetensors file; the message names the file."""


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise CorruptWeightsError unless ``path`` has a readable header whose tensors fit the file exactly."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptWeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CorruptWeightsError(
                f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes in a file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptWeightsError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    try:
        end = max((int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CorruptWeightsError(f"{path}: corrupt safetensors file (a tensor without data offsets)") from None
    data = size - 8 - header_len
    if data < end:
        raise CorruptWeightsError(
            f"{path}: truncated safetensors file ({data} bytes of tensor data, the header "
            f"lists {end}); the file was cut short, copy or download it again"
        )
    if data > end:
        raise CorruptWeightsError(f"{path}: corrupt safetensors file ({data - end} bytes after the last tensor)")


def check_weight_files(directory: str | os.PathLike) -> None:
    """:func:`check_safetensors_file` on every ``*.safetensors`` file directly in ``directory``."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors_file(path)
