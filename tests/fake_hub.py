"""A local stand-in for the Hugging Face Hub (and a raw file host) on 127.0.0.1 for the download tests (test_hub,
test_fineweb, test_evals): files by URL path; large files answered with the Hub's LFS-style redirect to
/cdn/<sha256> carrying X-Linked-Etag (sha256) and X-Linked-Size; Range requests; connections cut after a number of
bytes. Nothing here touches the network."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading


class FakeHub(http.server.ThreadingHTTPServer):
    """files: {"owner/name/file": bytes}; safetensors files are 'LFS': redirected to /cdn/<sha256>."""

    def __init__(self, handler=None):
        super().__init__(("127.0.0.1", 0), handler or Handler)
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cuts: list[int] = []        # each GET of a large file sends only this many bytes, then hangs up
        self.wrong_sha = False
        self.ignore_range = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        hub_, path = self.server, self.path.lstrip("/")
        hub_.log.append((self.command, path, self.headers.get("Range")))
        if path.startswith("cdn/"):
            blobs = {hashlib.sha256(b).hexdigest(): b for b in hub_.files.values()}
            return self._send(blobs.get(path[4:]), body, ranged=True)
        repo_file = path.replace("/resolve/main/", "/", 1)
        data = hub_.files.get(repo_file)
        if data is None or not repo_file.endswith(".safetensors"):
            return self._send(data, body, etag=f'"{hashlib.sha1(data or b"").hexdigest()}"')
        self._redirect(data)

    def _redirect(self, data: bytes):
        """The Hub's answer for a large file: to its storage, with its sha256 and size."""
        sha = hashlib.sha256(data).hexdigest()
        self.send_response(302)
        self.send_header("Location", f"/cdn/{sha}")
        self.send_header("X-Linked-Etag", f'"{"0" * 64 if self.server.wrong_sha else sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, data, body, etag=None, ranged=False):
        """data (404 when None); ranged: Range requests honoured and `cuts` applied."""
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if ranged and rng and not self.server.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        if body:
            out = data[start:]
            if ranged and self.server.cuts:
                out = out[:self.server.cuts.pop(0)]
            self.wfile.write(out)


@contextlib.contextmanager
def serving(server: FakeHub, tmp_path, monkeypatch):
    """Runs `server` in a thread, with the Hub endpoint pointing at it, the cache in tmp_path and offline mode off."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    monkeypatch.setenv("LLMPY_HF_ENDPOINT", server.url)
    monkeypatch.setenv("LLMPY_CACHE", str(tmp_path / "cache"))
    for v in ("LLMPY_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
