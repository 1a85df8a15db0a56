"""Atomic file writes: nothing a user produced (.mat, checkpoints' side files, images, logs) is ever
left half-written. Used by every writer in the project."""
from __future__ import annotations

import contextlib
import os
import tempfile


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode="wb", encoding=None):
    """Open a temporary file beside ``path``; when the block ends without error the file is flushed,
    fsynced, given the permissions a plain ``open`` would (0666 minus the umask; ``mkstemp`` makes
    0600) and renamed over ``path``. On error the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def check_writable(path, what, directory=False):
    """Raise OSError (the message names ``what``, e.g. the flag, and ``path``) unless a file
    (``directory=False``) or a directory (``directory=True``) can be written at ``path``: ``path``
    is absent or of that kind, and its nearest existing ancestor is a writable directory (so the
    missing ones can be created). Checked before any work, so a run never ends in an unwritable
    output."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if directory and not os.path.isdir(path):
            raise NotADirectoryError(f"{what} {path}: exists and is not a directory")
        if not directory and os.path.isdir(path):
            raise IsADirectoryError(f"{what} {path}: is a directory, expected a file path")
        ancestor = path if directory else os.path.dirname(path)
    else:
        ancestor = os.path.dirname(path)
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(f"{what} {path}: cannot write there ({ancestor} is not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot write there ({ancestor} is not writable)")
