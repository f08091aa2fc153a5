"""Model weights from the Hugging Face Hub: OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) or any
repository as `hf:owner/name[@revision]`, fetched once into the cache and read from there (offline) afterwards.

Only `config.json` and safetensors files are fetched (`model.safetensors`, or `model.safetensors.index.json` and
its shards); nothing is unpickled. Cache layout: `cache_dir()/hub/<owner>--<name>/<revision>/<file>`; a file there
is complete and verified, because a download goes to `<file>.<sha256 prefix>.part` and is renamed only after its
checks. A cached model is used as it is, without asking the Hub again (delete its folder to fetch it anew).

Environment: `LLMPY_HF_ENDPOINT` (else `HF_ENDPOINT`, else https://huggingface.co) is the server;
`LLMPY_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) uses the cache only.

Protocol (as huggingface_hub's): HEAD `{endpoint}/{repo}/resolve/{revision}/{file}` without following redirects.
For a large (LFS) file the Hub answers with a redirect to its storage that carries `X-Linked-Etag` (the file's
sha256) and `X-Linked-Size`; a small file is answered directly (`ETag`, `Content-Length`). Then GET, with
`Range: bytes=N-` when N bytes of a cut download are in the `.part` file (named after the version it holds, so
another version is never resumed); the size, and the sha256 where the Hub gives one, are checked.

Dataset files (`list_dataset_files`, `fetch_dataset_file`; used by data/fineweb.py) take the same path, with
`datasets/` before the repository in the URL. Cache layout: `cache_dir()/hub/datasets/<owner>--<name>/<revision>/
<path in the repository>`, and beside each listed folder's files the listing itself, `.tree.json` (a model folder's
name always holds `--`, so `hub/datasets/` cannot be a model's). The listing is the Hub API's
`GET {endpoint}/api/datasets/{repo}/tree/{revision}/{folder}` (as huggingface_hub's `HfApi.list_repo_tree`: a JSON
list of entries `{"type": "file" | "directory", "path", "size", "oid", "lfs": {"oid": sha256, "size", ...}}`, further
pages named by a `Link: <url>; rel="next"` header); it is fetched once and then read from the cache, like a model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..paths import cache_dir
from .atomic import atomic_write_bytes, fsync_dir

MODELS = {n: f"openai-community/{n}" for n in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
DEFAULT_ENDPOINT = "https://huggingface.co"
WEIGHTS, INDEX, CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
TIMEOUT_S = 30
ATTEMPTS = 3  # a download cut this many times in one call stops with an error; the next call resumes it
_CHUNK = 1 << 20
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_repo(name: str) -> tuple[str, str] | None:
    """(repository, revision) that a model name stands for (`gpt2`, `hf:owner/name@rev`), or None."""
    if name in MODELS:
        return MODELS[name], "main"
    if not name.startswith("hf:"):
        return None
    repo, _, rev = name[3:].partition("@")
    if not _REPO.match(repo) or ".." in repo or rev in (".", "..") or "/" in rev:
        raise UserError(f"{name}: want hf:owner/name or hf:owner/name@revision")
    return repo, rev or "main"


def endpoint() -> str:
    return (os.environ.get("LLMPY_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("LLMPY_OFFLINE", "HF_HUB_OFFLINE"))


def fetch_model(repo: str, revision: str = "main", *, progress: bool = True) -> Path:
    """The cache folder holding config.json and the weights of `repo` at `revision`, downloaded if not there."""
    folder = cache_dir() / "hub" / repo.replace("/", "--") / revision
    if _complete(folder):
        return folder
    if offline():
        raise UserError(f"{repo} is not in the cache ({folder}) and downloads are off (LLMPY_OFFLINE or "
                        "HF_HUB_OFFLINE is set)")
    folder.mkdir(parents=True, exist_ok=True)

    def get(name: str) -> None:
        download(repo, revision, name, folder / name, progress=progress)
    get(CONFIG)
    try:
        get(WEIGHTS)
    except _NotFound:  # a sharded model
        get(INDEX)
        for shard in sorted(_shards(folder / INDEX)):
            get(shard)
    return folder


def _complete(folder: Path) -> bool:
    if not (folder / CONFIG).is_file():
        return False
    if (folder / WEIGHTS).is_file():
        return True
    try:
        return (folder / INDEX).is_file() and all((folder / s).is_file() for s in _shards(folder / INDEX))
    except UserError:
        return False  # a damaged index in the cache is fetched again


def _shards(index: Path) -> set[str]:
    try:
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        names = set(wm.values())
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        raise UserError(f"{index} is not a valid safetensors index (no weight_map)") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise UserError(f"{index} names a shard that is not a file beside it: {bad[0]!r}")
    return names


class _NotFound(UserError):
    pass


class _Changed(UserError):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the redirect itself carries the Hub's X-Linked-* headers: hand it back as an HTTPError


def _head(url: str, what: str) -> tuple[str, str | None, int | None]:
    """(the URL to GET, the expected sha256 or None, the expected size or None), following redirects by hand."""
    opener = urllib.request.build_opener(_NoRedirect)
    sha = size = None
    for _ in range(5):
        try:
            r = opener.open(urllib.request.Request(url, method="HEAD", headers=_HEADERS), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            r = e
        status, h = r.status, r.headers
        r.close()
        linked = h.get("X-Linked-Etag")
        sha = sha or _sha256_of(linked or (h.get("ETag") if status == 200 else None))
        size = size or _int(h.get("X-Linked-Size") or (h.get("Content-Length") if status == 200 else None))
        if status == 200:
            return url, sha, size
        if status in (301, 302, 303, 307, 308) and h.get("Location"):
            target = urllib.parse.urljoin(url, h["Location"])
            if linked or urllib.parse.urlsplit(target).netloc != urllib.parse.urlsplit(url).netloc:
                return target, sha, size  # the storage behind the Hub: this redirect carried the file's metadata
            url = target  # a renamed repository and the like
            continue
        if status in (401, 404):  # the Hub says 401 for a repository that does not exist (or is private)
            raise _NotFound(f"cannot download {what}: no such file or public repository (HTTP {status})")
        raise UserError(f"cannot download {what}: HTTP {status} {getattr(r, 'reason', '')}".rstrip())
    raise UserError(f"cannot download {what}: too many redirects")


_HEADERS = {"User-Agent": "llmpy", "Accept-Encoding": "identity"}


def _sha256_of(etag: str | None) -> str | None:
    tag = (etag or "").removeprefix("W/").strip('"').lower()
    return tag if re.fullmatch(r"[0-9a-f]{64}", tag) else None


def _int(x: str | None) -> int | None:
    return int(x) if x and x.isdigit() else None


def download(repo: str, revision: str, name: str, dest: Path, *, progress: bool = True, repo_type: str = "model",
             sha256: str | None = None, size: int | None = None) -> None:
    """Fetch `name` of `repo` into `dest` (atomically, resuming a cut download); UserError naming the file.
    `repo_type` "dataset" reads a dataset repository; `sha256` and `size` (from a listing) are checked as well as
    what the Hub's HEAD answers."""
    prefix = {"model": "", "dataset": "datasets/"}[repo_type]
    url = (f"{endpoint()}/{prefix}{urllib.parse.quote(repo)}/resolve/{urllib.parse.quote(revision, safe='')}/"
           f"{urllib.parse.quote(name)}")
    what = f"{name} of {repo} from {endpoint()}"
    part = None
    with _locked(dest):  # ranks of one run share the cache: one downloads, the others then find the file
        if dest.is_file():
            return
        try:
            get_url, sha, got_size = _head(url, what)
            for listed, served, key in ((sha256, sha, "sha256"), (size, got_size, "size")):
                if listed is not None and served is not None and listed != served:
                    raise _Changed(f"cannot download {what}: the Hub lists it with {key} {listed} but serves "
                                   f"{served} (it changed since it was listed?)")
            sha, size = sha or sha256, got_size if got_size is not None else size
            part = dest.with_name(f"{dest.name}.{(sha or 'unverified')[:16]}.part")
            for old in dest.parent.glob(f"{dest.name}.*.part"):
                if old != part:
                    old.unlink(missing_ok=True)  # another version of the file: never spliced onto this one
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    _get(get_url, part, sha, size, what, progress)
                    break
                except _CUT:  # resume from what arrived
                    if attempt == ATTEMPTS:
                        raise
        except urllib.error.HTTPError as e:
            raise UserError(f"cannot download {what}: HTTP {e.code} {e.reason}") from None
        except _CUT as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            got = part.stat().st_size if part is not None and part.exists() else 0
            kept = (f"; {got} bytes are kept in {part}: run again to resume" if got else
                    "; offline? LLMPY_HF_ENDPOINT names another server, LLMPY_CACHE the cache to look in")
            raise UserError(f"cannot download {what} ({reason}){kept}") from None
        os.replace(part, dest)
        fsync_dir(dest.parent)


# a connection refused, reset, timed out or closed early (urllib's errors are OSErrors; http.client's are not)
_CUT = (OSError, http.client.HTTPException)


def _get(url: str, part: Path, sha: str | None, size: int | None, what: str, progress: bool) -> None:
    """Continue `part` from its current length to the whole file, then check its size and sha256."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        have = 0
    h = hashlib.sha256()
    if have:
        with open(part, "rb") as f:  # the sha256 covers the whole file: hash what an earlier attempt kept
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
    if size is None or have < size:
        headers = _HEADERS | ({"Range": f"bytes={have}-"} if have else {})
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as r:
            if have and (r.status != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                have, h = 0, hashlib.sha256()  # the server sent the whole file instead: start over
            length = _int(r.headers.get("Content-Length"))
            size = size if size is not None or length is None else have + length
            if progress:
                print(f"downloading {what} into {part.parent}", file=sys.stderr, flush=True)
            with open(part, "r+b" if have else "wb") as f, \
                    tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=part.name.rsplit(".", 2)[0],
                         disable=None if progress else True, file=sys.stderr) as bar:
                f.truncate(have)
                f.seek(have)
                for block in iter(lambda: r.read(_CHUNK), b""):
                    f.write(block)
                    h.update(block)
                    have += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
    if size is not None and have != size:
        raise ConnectionError(f"the connection closed after {have} of {size} bytes")
    if sha is not None and h.hexdigest() != sha:
        part.unlink()
        raise UserError(f"the download of {what} is damaged: its sha256 is {h.hexdigest()}, the Hub says {sha} "
                        "(the partial file was deleted; run again)")


@contextlib.contextmanager
def _locked(dest: Path):
    with open(dest.with_name(f".{dest.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ dataset files

@dataclasses.dataclass(frozen=True)
class RepoFile:
    """A file of a Hub repository as its tree listing gives it; `sha256` for LFS files only."""
    path: str
    size: int
    sha256: str | None = None


def list_tree(repo: str, folder: str = "", revision: str = "main", *, repo_type: str = "model") -> list[RepoFile]:
    """The files (not the subfolders) directly in `folder` of `repo`, asked of the Hub API page by page, in the
    order the Hub gives them; UserError when the folder is not there or the server cannot be reached."""
    prefix = {"model": "models", "dataset": "datasets"}[repo_type]
    sub = "/" + urllib.parse.quote(folder, safe="") if folder else ""  # quoted whole, as huggingface_hub does
    url = f"{endpoint()}/api/{prefix}/{urllib.parse.quote(repo)}/tree/{urllib.parse.quote(revision, safe='')}{sub}"
    what = f"the files of {repo}/{folder} at {revision} from {endpoint()}"
    files, pages = [], 0
    while url:
        pages += 1
        if pages > 10_000:
            raise UserError(f"cannot list {what}: the Hub's pages do not end")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=_HEADERS | {"Accept": "application/json"}),
                                        timeout=TIMEOUT_S) as r:
                body, link = r.read(), r.headers.get("Link", "")
        except urllib.error.HTTPError as e:
            raise UserError(f"cannot list {what}: HTTP {e.code} {e.reason}" +
                            (" (no such repository or folder)" if e.code in (401, 404) else "")) from None
        except _CUT as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            raise UserError(f"cannot list {what} ({reason}); offline? LLMPY_HF_ENDPOINT names another server, "
                            "LLMPY_CACHE the cache to look in") from None
        try:
            entries = json.loads(body)
            if not isinstance(entries, list):
                raise ValueError
            files += [_repo_file(e, folder) for e in entries if e["type"] == "file"]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UserError(f"cannot list {what}: the answer is not a tree listing") from None
        nxt = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
        url = urllib.parse.urljoin(url, nxt.group(1)) if nxt else None
    return files


def _repo_file(e: dict, folder: str) -> RepoFile:
    path, size = e["path"], e["size"]
    parts = path.split("/") if isinstance(path, str) else [""]
    if (not isinstance(size, int) or size < 0 or any(p in ("", ".", "..") for p in parts)
            or (folder and "/".join(parts[:-1]) != folder.strip("/"))):
        raise ValueError(path)  # a path that would leave the cache folder, or a file not in the folder listed
    lfs = e.get("lfs")
    return RepoFile(path, size, _sha256_of(lfs.get("oid")) if isinstance(lfs, dict) else None)


def dataset_folder(repo: str, revision: str = "main") -> Path:
    return cache_dir() / "hub" / "datasets" / repo.replace("/", "--") / revision


def list_dataset_files(repo: str, folder: str, revision: str = "main") -> list[RepoFile]:
    """`list_tree` of a dataset's folder, from the cache after the first time (`<folder>/.tree.json`)."""
    cached = dataset_folder(repo, revision) / folder / ".tree.json"
    try:
        return [RepoFile(**f) for f in json.loads(cached.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError, RecursionError):
        pass  # not listed yet, or a damaged listing: ask the Hub
    if offline():
        raise UserError(f"the file list of {repo}/{folder} is not in the cache ({cached}) and downloads are off "
                        "(LLMPY_OFFLINE or HF_HUB_OFFLINE is set)")
    files = list_tree(repo, folder, revision, repo_type="dataset")
    atomic_write_bytes(cached, json.dumps([dataclasses.asdict(f) for f in files], indent=0).encode())
    return files


def fetch_dataset_file(repo: str, f: RepoFile, revision: str = "main", *, progress: bool = True) -> Path:
    """The cached copy of dataset file `f` (from `list_dataset_files`), downloaded and checked against the listing
    (size, sha256) if it is not there; a cached copy of another size is fetched again."""
    dest = dataset_folder(repo, revision) / f.path
    if dest.is_file():
        if dest.stat().st_size == f.size:
            return dest
        print(f"{dest} has {dest.stat().st_size} bytes, the Hub lists {f.size}: fetching it again", file=sys.stderr)
        dest.unlink()
    if offline():
        raise UserError(f"{f.path} of {repo} is not in the cache ({dest}) and downloads are off (LLMPY_OFFLINE or "
                        "HF_HUB_OFFLINE is set)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download(repo, revision, f.path, dest, progress=progress, repo_type="dataset", sha256=f.sha256, size=f.size)
    except _Changed as e:
        listing = dataset_folder(repo, revision) / f.path.rpartition("/")[0] / ".tree.json"
        raise UserError(f"{e}; delete {listing} to list the files again") from None
    return dest
