"""Where llmpy keeps downloads and prepared data, and how a path the user gave is opened: every reader of a file
named on the command line goes through `open_input` (or `file_problem`, where a library opens the file), so that a
folder, a FIFO, a dangling link or an OS error is one sentence naming the path and its real cause."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def cache_dir() -> Path:
    """`$LLMPY_CACHE` if set, else `~/.cache/llmpy`; created on first use."""
    env = os.environ.get("LLMPY_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "llmpy"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {path}: {reason(e)} (set LLMPY_CACHE to another folder)")
    return path


def reason(e: OSError) -> str:
    """An OS error's cause in words ("no space left on device"), without the path (the caller names it)."""
    return (e.strerror or str(e) or type(e).__name__).lower() if isinstance(e, OSError) else str(e)


def _noun(mode: int) -> str:
    """What a file system entry is, for people."""
    for test, noun in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return noun
    return "a special file"


def _kind(mode: int) -> str | None:
    """Why an entry of this mode is not a file to read; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return "is a folder, not a file" if stat.S_ISDIR(mode) else f"is {_noun(mode)}, not a regular file"


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be used at all ("does not exist", "is a dangling symbolic link to X", "is a symbolic link
    loop", "cannot be read: permission denied"); None when it exists (a file, a folder, or anything else)."""
    p = os.fspath(path)
    try:
        os.stat(p)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(p):
            return f"is a dangling symbolic link (to {os.readlink(p)}, which does not exist)"
        if e.errno == errno.ENOENT:
            return "does not exist"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of it is a file, not a folder)"
        return f"cannot be read: {reason(e)}"


def file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file to read, in words (see path_problem; also "is a folder, not a file", "is a
    FIFO (named pipe), not a regular file"); None when it is one."""
    problem = path_problem(path)
    if problem is not None:
        return problem
    return _kind(os.stat(path).st_mode)


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a folder ("does not exist", "is a file, not a folder", ...); None when it is one."""
    problem = path_problem(path)
    if problem is None and not os.path.isdir(path):
        problem = f"is {_noun(os.stat(path).st_mode)}, not a folder"
    return problem


def check_file(path: str | os.PathLike, what: str = "") -> Path:
    """`path` as a Path when it is a regular file; else a UserError "<what> <path> <problem>"."""
    problem = file_problem(path)
    if problem is not None:
        raise UserError(f"{what}{' ' if what else ''}{path} {problem}")
    return Path(path)


def open_input(path: str | os.PathLike, what: str = "") -> BinaryIO:
    """`path` opened for binary reading when it is a regular file. A FIFO is refused without blocking (it is opened
    non-blocking and checked before any read); anything else that is not a regular file, and every OS error, is a
    one-line UserError naming the path and the cause. `what` says what the file is for ("token shard")."""
    where = f"{what}{' ' if what else ''}{path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        problem = path_problem(path)
        raise UserError(f"{where} {problem}" if problem else f"cannot read {where}: {reason(e)}") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise UserError(f"{where} {kind}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | os.PathLike, what: str = "") -> bytes:
    """The bytes of a regular file (open_input's checks); a read error is a one-line UserError too."""
    with open_input(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise UserError(f"cannot read {what}{' ' if what else ''}{path}: {reason(e)}") from None


def make_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """Creates the folder `path` (and its parents) unless it is one; a one-line UserError naming it and the cause
    when that cannot be done (it is a file, a FIFO, a dangling link; no permission, no space, ...)."""
    p = Path(path)
    if os.path.isdir(p):
        return p
    if os.path.lexists(p):
        problem = path_problem(p)
        raise UserError(f"cannot create the {what} {p}: it " + (problem if problem else
                                                                f"is {_noun(os.stat(p).st_mode)} already"))
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the {what} {p}: {reason(e)}") from None
    return p
