"""Atomic file replacement: a reader sees either the previous file or the complete new one, never a torn write.

Every writer in `llmpy.formats` goes through `atomic_write`: the bytes go to a temporary file in the target's
folder (same filesystem, so the rename is atomic), are flushed and fsync'ed, and only then renamed over the
target. If `write_fn` raises, the temporary file is removed and the previous file (if any) is untouched.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import UserError
from ..paths import folder_problem, make_dir, reason


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write_fn(f)` writes to the binary file object `f`."""
    path = Path(path)
    folder = path.parent
    problem = folder_problem(folder)
    if problem is not None:
        raise UserError(f"cannot write {path}: {folder} {problem}")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write {path}: {reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, UserError):
            raise UserError(f"cannot write {path}: {reason(e)}") from e
        raise
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, *chunks) -> None:
    """`atomic_write` for data already in memory (bytes, memoryviews, contiguous arrays); creates the folder."""
    make_dir(Path(path).parent)

    def write(f):
        for chunk in chunks:
            f.write(chunk)
    atomic_write(path, write)


def fsync_dir(folder: Path) -> None:
    """Makes a rename into `folder` durable across a power loss; not possible on every OS/filesystem, so best
    effort."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
