"""Errors a user can fix, shown by the command-line tools as one line instead of a traceback.

Each CLI runs its work inside :func:`user_errors`: bad input (``ValueError``, which our data, config and run-folder
errors derive from), file system faults (``OSError``: missing or unreadable files, a full disk) and unreadable
weights become ``error: <message>`` and exit status 1; ``--debug`` (:func:`add_debug_flag`) lets the traceback
through instead. A finished run asked to resume (:class:`~softmask_ext.training.run_folder.RunFinished`) is not a
failure: its message is printed and the exit status is 0. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Iterator

from safetensors import SafetensorError

from .training.checkpoint import CorruptCheckpointError
from .training.run_folder import RunFinished

__all__ = ["add_debug_flag", "describe", "user_errors"]

_USER_ERRORS = (ValueError, OSError, SafetensorError, CorruptCheckpointError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")


def describe(error: BaseException) -> str:
    """The one-line message for ``error``; names the file where the error knows it."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return (
            f"no space left on device{where}. Free some disk space (or lower --keep-checkpoints) and continue "
            "with --resume; the latest checkpoint is intact"
        )
    if isinstance(error, SafetensorError):
        return f"cannot read a .safetensors weight file ({error}); it may be truncated or corrupt"
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(error):
        return f"{error.filename}: {error.strerror or error}"
    return str(error)


@contextlib.contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn the errors a user can fix into ``SystemExit("error: ...")`` (see the module docstring)."""
    try:
        yield
    except RunFinished as e:
        print(e, file=sys.stderr)
        raise SystemExit(0) from None
    except _USER_ERRORS as e:
        if debug:
            raise
        raise SystemExit(f"error: {describe(e)}") from None
