"""A `Watchdog` that stops every rank of a job when one dies or hangs (heartbeats over TCP to rank 0)."""
from __future__ import annotations

import faulthandler
import os
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Callable

from ..errors import UserError
from .env import DEFAULT_TIMEOUT, EXIT_CODE, STARTUP_TIMEOUT, DistEnv
from .rendezvous import _listen, _ranges

_WD_MAGIC = b"LPWD"
_MSG = struct.Struct("!4sBH")  # magic, kind, payload length; then the payload
_HELLO_WD, _BEAT, _DONE, _FAIL, _ABORT, _BYE = b"HBDFAY"  # kinds: rank -> 0: H B D F; 0 -> rank: B A Y


def _msg(kind: int, payload: bytes = b"") -> bytes:
    return _MSG.pack(_WD_MAGIC, kind, len(payload)) + payload


class _Reader:
    """Whole messages out of a byte stream."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        while len(self.buf) >= _MSG.size:
            magic, kind, n = _MSG.unpack_from(self.buf)
            if magic != _WD_MAGIC:
                raise ValueError("not an llmpy watchdog stream")
            if len(self.buf) < _MSG.size + n:
                break
            out.append((kind, bytes(self.buf[_MSG.size:_MSG.size + n])))
            del self.buf[:_MSG.size + n]
        return out


class Watchdog:
    """Stops the whole job when a rank dies or hangs, instead of leaving the others blocked in a collective.

    Rank 0 serves a monitor on `port` (default MASTER_PORT+1); every other rank's watchdog thread connects and
    sends a heartbeat every min(2, timeout/5) s. The monitor tells every rank to abort when a rank's connection
    drops or it sends nothing for `timeout` s; a rank aborts by itself when the monitor's connection drops or goes
    silent, or when its own `progress()` calls stop for `timeout` s (a local hang; before the first progress()
    the limit is `startup_timeout`, default max(timeout, 600 s): the first step compiles kernels; it also bounds
    how long rank 0 waits for every rank to join). Abort = one line on stderr, `on_abort()` (given at most
    10 s: e.g. abort the NCCL communicator), then `exit_fn(EXIT_CODE)`. `stop()` leaves cleanly: the others
    stop watching this rank (rank 0: the others stop watching the monitor). `ready` is set once this rank is
    connected to the monitor (rank 0: once every rank has joined).

    Heartbeats come from a thread, so a dead or frozen process is seen remotely and a main thread stuck in a
    collective locally. If that thread cannot run at all (a C call hung holding the GIL), faulthandler's C thread
    dumps every thread's stack and exits with status 1 after 2*limit + 10 s (only with the default exit_fn)."""

    def __init__(self, env: DistEnv, timeout: float = DEFAULT_TIMEOUT, port: int | None = None,
                 on_abort: Callable[[], object] | None = None, *, startup_timeout: float | None = None,
                 exit_fn: Callable[[int], object] = os._exit):
        if not timeout > 0:
            raise UserError(f"watchdog timeout must be > 0 s, got {timeout}")
        self.env, self.timeout = env, float(timeout)
        self.startup_timeout = (max(self.timeout, STARTUP_TIMEOUT) if startup_timeout is None
                                else float(startup_timeout))
        self.port = env.master_port + 1 if port is None else port
        self.on_abort, self.exit_fn = on_abort, exit_fn
        self.interval = min(2.0, self.timeout / 5)
        self.abort_reason: str | None = None  # set when this rank aborted (read by tests)
        self.ready = threading.Event()  # set once connected to rank 0's monitor (rank 0: once every rank joined)
        self._hard = exit_fn is os._exit
        self._progress_t = self._hard_t = 0.0
        self._progressed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._srv: socket.socket | None = None
        self._conns: dict[socket.socket, _Reader] = {}

    # ---- the training loop's side
    def start(self) -> "Watchdog":
        self._t0 = self._progress_t = time.monotonic()
        if self.env.rank == 0 and self.env.world > 1:  # listen now: a busy port is the caller's error, at once
            self._srv = _listen(self.port, "watchdog", min(self.env.world, 1024))
        target = self._serve if self.env.rank == 0 else self._watch
        self._thread = threading.Thread(target=target, name=f"llmpy-watchdog-{self.env.rank}", daemon=True)
        self._thread.start()
        self._arm_hard(self.startup_timeout)
        return self

    def progress(self) -> None:
        """Call once per step: the main thread is alive and moving."""
        self._progress_t = now = time.monotonic()
        self._progressed = True
        if self._hard and now - self._hard_t > 1.0:  # re-arming costs ~35 us: at most once a second
            self._arm_hard(self.timeout)

    def stop(self) -> None:
        """Clean end: tell the others this rank finished, and stop watching."""
        if self._hard:
            faulthandler.cancel_dump_traceback_later()
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout=5.0)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _arm_hard(self, limit: float) -> None:
        if self._hard:
            self._hard_t = time.monotonic()
            try:
                faulthandler.dump_traceback_later(2 * limit + 10, exit=True)
            except (RuntimeError, ValueError, OSError):  # stderr is not a file (embedded, redirected): no backstop
                self._hard = False

    # ---- the watchdog thread
    def _local_reason(self, now: float) -> str | None:
        idle = now - self._progress_t
        if self._progressed and idle > self.timeout:
            return f"no progress for {idle:.0f} s inside the training step"
        if not self._progressed and idle > self.startup_timeout:
            return f"no progress for {idle:.0f} s before the first step"
        return None

    def _abort(self, reason: str, tell: str | None = None) -> None:
        with self._lock:
            if self.abort_reason is not None:
                return
            self.abort_reason = reason
        print(f"rank {self.env.rank}: {reason}; stopping", file=sys.stderr, flush=True)
        conns = list(self._conns)  # rank 0 first tells the others, so that they stop too
        for conn in conns:
            _send_quietly(conn, _msg(_ABORT, (tell or f"rank 0 reports {reason}").encode()))
        if conns:
            _close_after_peer(conns, min(1.0, self.timeout))
        if self.on_abort is not None:  # in a thread: a hung communicator abort must not keep us alive
            t = threading.Thread(target=self._call_on_abort, daemon=True)
            t.start()
            t.join(timeout=min(10.0, self.timeout))
        self.exit_fn(EXIT_CODE)

    def _call_on_abort(self) -> None:
        try:
            self.on_abort()
        except Exception as e:  # we are stopping anyway; say why the cleanup failed
            print(f"rank {self.env.rank}: on_abort failed: {e!r}", file=sys.stderr, flush=True)

    def _connect(self) -> socket.socket | None:
        addr, deadline, err = self.env.master_addr, self._t0 + self.startup_timeout, "no attempt"
        while not self._stop.is_set():
            try:
                s = socket.create_connection((addr, self.port), timeout=min(5.0, self.timeout))
                s.settimeout(min(2.0, self.timeout))
                s.sendall(_msg(_HELLO_WD, struct.pack("!II", self.env.world, self.env.rank)))
                return s
            except OSError as e:
                err = e.strerror or str(e) or type(e).__name__
            if time.monotonic() > deadline:
                self._abort(f"cannot reach rank 0's watchdog at {addr}:{self.port} within {self.startup_timeout:g} s "
                            f"({err}); rank 0 may not be running")
                return None
            self._stop.wait(min(0.1, self.interval))
        return None

    def _watch(self) -> None:
        """Ranks > 0: heartbeats to rank 0, its orders, the local progress check."""
        sock = self._connect()
        if sock is None:
            return
        self.ready.set()
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        if sock is not None:
            sel.register(sock, selectors.EVENT_READ)
        reader, last_sent, last_heard = _Reader(), 0.0, time.monotonic()
        try:
            while True:
                for key, _ in sel.select(self.interval / 2):
                    if key.fileobj is self._wake_r:
                        if sock is not None:
                            _send_quietly(sock, _msg(_DONE))
                            sel.unregister(sock)
                            _close_after_peer([sock], min(2.0, self.timeout))
                            sock = None
                        return
                    try:
                        data = sock.recv(4096)
                        msgs = reader.feed(data)
                    except (OSError, ValueError):
                        data, msgs = b"", []
                    if not data:
                        return self._abort("rank 0's watchdog connection dropped (rank 0 died?)")
                    last_heard = time.monotonic()
                    for kind, payload in msgs:
                        if kind == _ABORT:
                            return self._abort(payload.decode(errors="replace"))
                        if kind == _BYE:  # rank 0 finished normally: stop watching it
                            sel.unregister(sock)
                            sock.close()
                            sock = None
                            break
                now = time.monotonic()
                if sock is not None:
                    if now - last_sent >= self.interval:
                        last_sent = now
                        if not _send_quietly(sock, _msg(_BEAT)):
                            return self._abort("lost the connection to rank 0's watchdog (rank 0 died?)")
                    if now - last_heard > self.timeout:
                        return self._abort(f"rank 0's watchdog sent nothing for {now - last_heard:.0f} s (rank 0 "
                                           "died or hung, or the network is down)")
                reason = self._local_reason(now)
                if reason:
                    if sock is not None:
                        _send_quietly(sock, _msg(_FAIL, reason.encode()))
                        sel.unregister(sock)
                        _close_after_peer([sock], min(1.0, self.timeout))
                        sock = None
                    return self._abort(reason)
        finally:
            sel.close()
            if sock is not None:
                sock.close()

    def _serve(self) -> None:
        """Rank 0: the monitor of every rank's heartbeats, and the local progress check."""
        sel, world = selectors.DefaultSelector(), self.env.world
        sel.register(self._wake_r, selectors.EVENT_READ)
        if self._srv is not None:
            sel.register(self._srv, selectors.EVENT_READ)
        else:
            self.ready.set()  # a world of one
        rank_of: dict[socket.socket, int] = {}
        last: dict[int, float] = {}  # rank -> when it was last heard
        done: set[int] = set()
        last_sent = 0.0
        try:
            while True:
                for key, _ in sel.select(self.interval / 2):
                    if key.fileobj is self._wake_r:
                        conns = list(self._conns)
                        for conn in conns:
                            _send_quietly(conn, _msg(_BYE))
                            sel.unregister(conn)
                        _close_after_peer(conns, min(2.0, self.timeout))
                        self._conns.clear()
                        return
                    if key.fileobj is self._srv:
                        try:
                            conn, _ = self._srv.accept()
                        except OSError:
                            continue
                        conn.settimeout(min(2.0, self.timeout))
                        self._conns[conn] = _Reader()
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    r = rank_of.get(conn)
                    try:
                        data = conn.recv(4096)
                        msgs = self._conns[conn].feed(data)
                    except (OSError, ValueError):
                        data, msgs = b"", []
                    if not data:
                        sel.unregister(conn)
                        del self._conns[conn]
                        rank_of.pop(conn, None)
                        conn.close()
                        if r is not None and r not in done:
                            return self._abort(f"rank {r}'s watchdog connection dropped (rank {r} died?)",
                                               f"rank {r}'s watchdog connection dropped (rank {r} died?)")
                        continue
                    for kind, payload in msgs:
                        if kind == _HELLO_WD and len(payload) == 8:
                            w, r = struct.unpack("!II", payload)
                            if w != world or not 0 < r < world or r in last:
                                why = (f"a process joined the watchdog on port {self.port} as rank {r} of {w}, but "
                                       f"this job has {world} ranks" + (f" and rank {r} already joined"
                                                                        if r in last else ""))
                                return self._abort(why, why)
                            rank_of[conn] = r
                            last[r] = time.monotonic()
                            if len(last) == world - 1:  # every rank has joined once (some may be done already)
                                self.ready.set()
                        elif r is None:
                            continue
                        elif kind == _DONE:
                            done.add(r)
                            try:
                                conn.shutdown(socket.SHUT_WR)  # the rank waits for this before it closes
                            except OSError:
                                pass
                        elif kind == _FAIL:
                            why = f"rank {r} reports {payload.decode(errors='replace')}"
                            return self._abort(why, why)
                        last[r] = time.monotonic()
                now = time.monotonic()
                if now - last_sent >= self.interval:  # heartbeats the other way: rank 0 is alive
                    last_sent = now
                    for conn in list(self._conns):
                        _send_quietly(conn, _msg(_BEAT))
                for r, t in last.items():
                    if r not in done and now - t > self.timeout:
                        why = f"rank {r} stopped sending heartbeats {now - t:.0f} s ago (died or hung)"
                        return self._abort(why, why)
                missing = set(range(1, world)) - set(last)
                if missing and now - self._t0 > self.startup_timeout:
                    why = (f"ranks {_ranges(missing)} never reached the watchdog on port {self.port} within "
                           f"{self.startup_timeout:g} s")
                    return self._abort(why, why)
                reason = self._local_reason(now)
                if reason:
                    return self._abort(reason)
        finally:
            sel.close()
            for conn in list(self._conns):
                conn.close()
            self._conns.clear()
            if self._srv is not None:
                self._srv.close()


def _close_after_peer(socks: list[socket.socket], limit: float) -> None:
    """Close once the peers have our last message: FIN after it, then read (and drop) what they still send until
    they close, for at most `limit` s. Closing with unread data would make the kernel send a reset instead, and
    the peer could see "connection reset" rather than our DONE / FAIL / BYE / ABORT."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
    for s in socks:
        s.close()


def _send_quietly(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False
