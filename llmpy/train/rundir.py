"""The run folder, owned by one run at a time.

`RunDir.claim` makes the folder (remembering whether it did), takes an exclusive lock on `.llmpy.lock` in it
(fcntl.flock: the kernel drops it when the process ends, however it ends), and removes the temporary files that
killed atomic writes left behind. `release` gives the lock back; `abandon` does too and removes the folder when
this run made it and it holds nothing else (a failed start leaves no empty run folder). Under data parallelism
only rank 0 claims the folder: it is the one that writes the checkpoint, metrics and plots.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UserError
from ..formats.atomic import atomic_write_bytes
from ..paths import make_dir, reason

LOCK = ".llmpy.lock"
CONFIG = "config.json"
# formats/atomic.py's temporary names: "." + the target's name + "." + mkstemp's 8 random characters + ".tmp",
# for the files a run writes
_OURS = r"(?:checkpoint(?:-\d+)?\.safetensors|zero-step\d+-rank\d+-of-\d+\.safetensors|metrics\.jsonl|loss\.png|" \
        r"config\.json)"
ORPHAN = re.compile(rf"\.{_OURS}\.[a-z0-9_]{{8}}\.tmp")
RUN_FILE = re.compile(_OURS)  # what a run writes in its folder


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.made: list[Path] = []  # the folders this run created, innermost last
        self._fd: int | None = None

    def claim(self) -> int:
        """Creates and locks the folder; returns how many orphaned temporary bytes it removed."""
        missing = []
        p = self.path
        while not os.path.lexists(p) and p != p.parent:
            missing.append(p)
            p = p.parent
        make_dir(self.path, "run folder")
        self.made = missing[::-1]
        self._lock()
        return self._remove_orphans()

    def _lock(self) -> None:
        import fcntl
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self.abandon()
            raise UserError(f"cannot lock the run folder {self.path}: {reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{self.path} is in use by another llmpy run (it holds {lock}): wait for it to end or "
                            "choose another --out") from None
        self._fd = fd

    @staticmethod
    def sweep(path: Path) -> int:
        """Removes the orphaned temporary files of a run folder that no run holds (a resume refused on it, such as
        one of a finished run, still cleans up after the kill that interrupted its last writes); returns the bytes
        freed. Nothing is created: a folder without a lock file is no run folder."""
        import fcntl
        folder = RunDir(path)
        if not os.path.isfile(folder.path / LOCK):
            return 0
        try:
            fd = os.open(folder.path / LOCK, os.O_RDWR)
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return folder._remove_orphans()
        except OSError:  # in use by a run (it cleans up itself), or not ours to clean
            return 0
        finally:
            os.close(fd)

    def _remove_orphans(self) -> int:
        """Temporary files of atomic writes that a kill interrupted (only our names, only under our lock)."""
        freed = 0
        for p in self.path.iterdir():
            if ORPHAN.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
        return freed

    def contents(self) -> list[str]:
        """What the folder holds besides the lock."""
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK)

    def write_config(self, settings: dict) -> None:
        """config.json: every setting of the run, for people (resume reads the checkpoint, not this)."""
        text = json.dumps(settings, indent=2, default=str, allow_nan=False)  # settings are checked finite
        atomic_write_bytes(self.path / CONFIG, (text + "\n").encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the lock file stays: removing it would let two runs lock different files
            self._fd = None

    def abandon(self) -> None:
        """After a failed start: release, and remove the folders this run made if nothing else is in them."""
        if self.made and self.path.is_dir() and not self.contents():
            (self.path / LOCK).unlink(missing_ok=True)
            for p in reversed(self.made):
                try:
                    p.rmdir()
                except OSError:
                    break
        self.release()
        self.made = []
