"""Crash-safe file replacement: a crash leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import shutil
import threading


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: written to a temporary file beside it, fsynced, given the old file's mode,
    renamed over it, and the folder fsynced so that the rename itself survives a power cut."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a folder's entries (a new or renamed file) durable; a no-op where the file system can't."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not supported everywhere (some network file systems)
    finally:
        os.close(fd)
