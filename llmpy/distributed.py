"""Data parallelism, the parts that need no GPU: who am I (`dist_env`: our launcher, Open MPI, MPICH/PMI, Slurm),
handing NCCL's unique id from rank 0 to every rank (`exchange_id`: TCP, a shared file or MPI), a `Watchdog` that
stops every rank when one dies or hangs, ZeRO shard arithmetic, and `FakeComm`, an in-process communicator over
threads that checks the collectives' math on the CPU.

Ports: rank 0 serves the id rendezvous on MASTER_PORT (only while ranks join) and the watchdog on MASTER_PORT+1.
A watchdog abort exits with EXIT_CODE (75, EX_TEMPFAIL: the job can be restarted from its last checkpoint).
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import selectors
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .errors import UserError
from .formats.atomic import atomic_write_bytes

EXIT_CODE = 75
STARTUP_TIMEOUT = 600.0  # the watchdog's default limit before the first progress() (kernel compilation)
DEFAULT_ADDR, DEFAULT_PORT, DEFAULT_TIMEOUT = "127.0.0.1", 29500, 300.0
RDZV_METHODS = ("tcp", "file", "mpi")
# What `llmpy launch` sets in every child (LLMPY_JOB_ID only when it makes one up: see launch.py).
ENV_RANK, ENV_WORLD, ENV_LOCAL_RANK, ENV_LOCAL_WORLD = ("LLMPY_RANK", "LLMPY_WORLD_SIZE", "LLMPY_LOCAL_RANK",
                                                        "LLMPY_LOCAL_WORLD_SIZE")
ENV_RDZV, ENV_RDZV_PATH, ENV_TIMEOUT, ENV_JOB_ID = "LLMPY_RDZV", "LLMPY_RDZV_PATH", "LLMPY_TIMEOUT", "LLMPY_JOB_ID"


def force_nccl_settings(environ: dict = os.environ) -> str | None:
    """NVLink multicast (NVLS) must stay off on our machines, whatever the user's environment says: set it before
    NCCL reads its environment (communicator creation). Returns a note when a different value was overridden."""
    old = environ.get("NCCL_NVLS_ENABLE")
    environ["NCCL_NVLS_ENABLE"] = "0"
    if old is not None and old != "0":
        return f"NCCL_NVLS_ENABLE={old} overridden to 0 (NVLink multicast stays off on these machines)"
    return None


# ---------------------------------------------------------------------------------------------- environment

@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int                  # index among the ranks on this node: the GPU to use
    local_world: int
    master_addr: str = DEFAULT_ADDR
    master_port: int = DEFAULT_PORT
    source: str = "single"           # llmpy | openmpi | mpich | slurm | single
    job_id: str = ""                 # the same on every rank of a job, new per job ("" unknown): file rendezvous
    rdzv: str = "tcp"                # how to exchange the NCCL id (LLMPY_RDZV)
    rdzv_path: str | None = None     # the file for rdzv=file (LLMPY_RDZV_PATH)
    timeout: float = DEFAULT_TIMEOUT  # seconds for the rendezvous and the watchdog (LLMPY_TIMEOUT)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _get_int(e: Mapping[str, str], name: str, default: int | None = None) -> int:
    v = e.get(name)
    if v is None or v == "":
        if default is None:
            raise UserError(f"{name} is not set (the other distributed variables are)")
        return default
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{name}={v!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: "node[01-04,07]" -> node01..node04, node07 (zero padding kept);
    "a,b" -> a, b; "gpu[1-2]-ib,login" -> gpu1-ib, gpu2-ib, login."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):  # split at commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [h for item in items if item for h in _expand_item(item, nodelist)]


def _expand_item(item: str, whole: str) -> list[str]:
    i = item.find("[")
    if i < 0:
        return [item]
    j = item.find("]", i)
    if j < 0:
        raise UserError(f"cannot read the Slurm node list {whole!r}: '[' without ']'")
    out = []
    for part in item[i + 1:j].split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit():
            raise UserError(f"cannot read the Slurm node list {whole!r}: bad range {part!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            out += [f"{item[:i]}{n:0{len(lo)}d}{tail}" for tail in _expand_item(item[j + 1:], whole)]
    return out


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE: "4(x2),3" -> [4, 4, 3]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"cannot read Slurm's tasks per node {spec!r}")
        out += [int(m[1])] * int(m[2] or 1)
    return out


def _slurm_local(e: Mapping[str, str]) -> tuple[int, int] | None:
    if "SLURM_LOCALID" not in e:
        return None
    # the step's layout (srun) before the job's: a step may use fewer tasks than the allocation
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if e.get(name):
            counts = tasks_per_node(e[name])
            node = min(_get_int(e, "SLURM_NODEID", 0), len(counts) - 1)
            return _get_int(e, "SLURM_LOCALID"), counts[node]
    return None


def dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """This process's place in the job, from the first of: our launcher (LLMPY_RANK, LLMPY_WORLD_SIZE,
    LLMPY_LOCAL_RANK, LLMPY_LOCAL_WORLD_SIZE), Open MPI (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_RANK, PMI_SIZE,
    MPI_LOCALRANKID, MPI_LOCALNRANKS), Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, tasks per node);
    else one process. MASTER_ADDR (default: the first host of Slurm's node list, else 127.0.0.1) and MASTER_PORT
    (default 29500) locate rank 0. Job id: LLMPY_JOB_ID, else Slurm's job and step id, else PMIx's namespace."""
    e = environ
    slurm_local = _slurm_local(e)
    if ENV_RANK in e or ENV_WORLD in e:
        source, rank, world = "llmpy", _get_int(e, ENV_RANK), _get_int(e, ENV_WORLD)
        local = _get_int(e, ENV_LOCAL_RANK, rank), _get_int(e, ENV_LOCAL_WORLD, world)
    elif "OMPI_COMM_WORLD_RANK" in e:
        source, rank, world = "openmpi", _get_int(e, "OMPI_COMM_WORLD_RANK"), _get_int(e, "OMPI_COMM_WORLD_SIZE")
        local = _get_int(e, "OMPI_COMM_WORLD_LOCAL_RANK"), _get_int(e, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "PMI_RANK" in e:
        source, rank, world = "mpich", _get_int(e, "PMI_RANK"), _get_int(e, "PMI_SIZE")
        if "MPI_LOCALRANKID" in e:
            local = _get_int(e, "MPI_LOCALRANKID"), _get_int(e, "MPI_LOCALNRANKS")
        else:  # srun --mpi=pmi2 sets PMI_* but not MPICH's local ids; one node when nothing says otherwise
            local = slurm_local or (rank, world)
    elif "SLURM_PROCID" in e:
        source, rank = "slurm", _get_int(e, "SLURM_PROCID")
        world = _get_int(e, "SLURM_STEP_NUM_TASKS", _get_int(e, "SLURM_NTASKS", _get_int(e, "SLURM_NPROCS", 1)))
        local = slurm_local or (rank, world)
    else:
        source, rank, world, local = "single", 0, 1, (0, 1)
    local_rank, local_world = local
    names = {"llmpy": "LLMPY_*", "openmpi": "OMPI_COMM_WORLD_*", "mpich": "PMI_*/MPI_LOCAL*",
             "slurm": "SLURM_*"}.get(source, "")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad {names} environment: rank {rank} of world size {world} (need 0 <= rank < world)")
    if not 0 <= local_rank < local_world <= world:
        raise UserError(f"bad {names} environment: local rank {local_rank} of {local_world} on this node, "
                        f"world size {world} (need 0 <= local rank < local size <= world)")

    addr = e.get("MASTER_ADDR")
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
    if not addr and nodelist and source != "llmpy":
        addr = expand_nodelist(nodelist)[0]
    port = _get_int(e, "MASTER_PORT", DEFAULT_PORT)
    if not 1 <= port <= 65534:
        raise UserError(f"MASTER_PORT={port} must be in 1..65534 (the watchdog uses the port after it)")

    job_id = e.get(ENV_JOB_ID) or ""
    if not job_id and e.get("SLURM_JOB_ID"):
        job_id = f"slurm-{e['SLURM_JOB_ID']}.{e.get('SLURM_STEP_ID', '')}"  # two sruns in one job differ by step
    if not job_id and e.get("PMIX_NAMESPACE"):
        job_id = f"pmix-{e['PMIX_NAMESPACE']}"
    # Under mpirun across nodes with no MASTER_ADDR, only MPI itself knows where rank 0 is.
    default_rdzv = "mpi" if source in ("openmpi", "mpich") and not addr and local_world < world else "tcp"
    rdzv = e.get(ENV_RDZV) or default_rdzv
    if rdzv not in RDZV_METHODS:
        raise UserError(f"{ENV_RDZV}={rdzv!r}: use one of {', '.join(RDZV_METHODS)}")
    try:
        timeout = float(e.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT)
    except ValueError:
        raise UserError(f"{ENV_TIMEOUT}={e[ENV_TIMEOUT]!r} is not a number of seconds") from None
    if not timeout > 0:
        raise UserError(f"{ENV_TIMEOUT} must be > 0 seconds, got {timeout}")
    return DistEnv(rank, world, local_rank, local_world, addr or DEFAULT_ADDR, port, source, job_id, rdzv,
                   e.get(ENV_RDZV_PATH) or None, timeout)


# ---------------------------------------------------------------------------------------------- rendezvous

_RDZV_MAGIC, _RDZV_VERSION, MAX_ID_BYTES = b"LLMPYRDZ", 1, 4096
_HELLO = struct.Struct("!8sHII")   # rank -> rank 0: magic, version, world, rank
_REPLY = struct.Struct("!8sHII")   # rank 0 -> rank: magic, version, world, id length; then the id


def exchange_id(env: DistEnv, blob: bytes | None, *, method: str = "tcp", path: str | None = None,
                timeout: float = 120.0) -> bytes:
    """Rank 0 passes `blob` (NCCL's unique id), every rank gets it back. tcp: rank 0 serves it on
    MASTER_ADDR:MASTER_PORT until all world-1 ranks have it. file: rank 0 writes it to `path` on a file system
    every node sees, tagged with the job id so a file left by an earlier job is never used. mpi: a broadcast
    over MPI_COMM_WORLD (mpi4py; no timeout there). A rank that cannot finish within `timeout` s raises UserError."""
    if env.rank == 0:
        if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_ID_BYTES:
            raise ValueError(f"rank 0 must pass the id as at most {MAX_ID_BYTES} bytes")
        blob = bytes(blob)
    if env.world == 1:
        return blob
    if method == "tcp":
        return _tcp_serve(env, blob, timeout) if env.rank == 0 else _tcp_fetch(env, timeout)
    if method == "file":
        return _file_exchange(env, blob, path, timeout)
    if method == "mpi":
        return _mpi_exchange(env, blob)
    raise UserError(f"unknown rendezvous method {method!r}: use one of {', '.join(RDZV_METHODS)}")


def _listen(port: int, what: str, backlog: int = 128) -> socket.socket:
    try:  # every interface: MASTER_ADDR may be a name that resolves to another of this node's addresses
        return socket.create_server(("", port), backlog=backlog)
    except OSError as e:
        raise UserError(f"rank 0 cannot listen on port {port} for the {what}: {e.strerror or e} (is another job "
                        "using it? choose another MASTER_PORT / --master-port)") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def _ranges(ranks) -> str:
    ranks = sorted(ranks)
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


def _tcp_serve(env: DistEnv, blob: bytes, timeout: float) -> bytes:
    deadline, served = time.monotonic() + timeout, set()
    with _listen(env.master_port, "rendezvous", min(env.world, 1024)) as srv:
        while len(served) < env.world - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = set(range(1, env.world)) - served
                hint = " (under Slurm, start one process per task with srun)" if env.source == "slurm" else ""
                raise UserError(f"rank 0: only {len(served) + 1} of {env.world} ranks joined the rendezvous on port "
                                f"{env.master_port} within {timeout:g} s; missing ranks {_ranges(missing)} (not "
                                f"started, crashed, or cannot reach {env.master_addr}:{env.master_port}){hint}")
            srv.settimeout(min(left, 1.0))
            try:
                conn, peer = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(min(left, 10.0))
                try:
                    magic, version, world, rank = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
                    if magic != _RDZV_MAGIC:
                        continue  # not one of ours (a port scan): ignore it
                    # answer even a mismatched rank, so that it fails with a clear message too
                    conn.sendall(_REPLY.pack(_RDZV_MAGIC, _RDZV_VERSION, env.world, len(blob)) + blob)
                except OSError:
                    continue  # the rank gave up or died mid-way; it retries if it is alive
                if version != _RDZV_VERSION or world != env.world or not 0 < rank < world:
                    raise UserError(f"rank 0: a process at {peer[0]} joined the rendezvous on port {env.master_port} "
                                    f"as rank {rank} of {world} (protocol {version}), but this job has {env.world} "
                                    "ranks: two jobs on one port, or ranks started with different settings")
                served.add(rank)  # a rank that retried after a lost reply is served again, counted once
    return blob


def _tcp_fetch(env: DistEnv, timeout: float) -> bytes:
    addr, port, deadline = env.master_addr, env.master_port, time.monotonic() + timeout
    delay, last_err = 0.05, "no attempt"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"rank {env.rank}: could not get the NCCL id from rank 0's rendezvous at {addr}:{port} "
                            f"within {timeout:g} s ({last_err}); rank 0 may not be running, or MASTER_ADDR/"
                            "MASTER_PORT differ between ranks")
        try:
            with socket.create_connection((addr, port), timeout=min(left, 10.0)) as s:
                s.sendall(_HELLO.pack(_RDZV_MAGIC, _RDZV_VERSION, env.world, env.rank))
                magic, version, world, n = _REPLY.unpack(_recv_exact(s, _REPLY.size))
                if magic != _RDZV_MAGIC or version != _RDZV_VERSION or n > MAX_ID_BYTES:
                    raise UserError(f"rank {env.rank}: {addr}:{port} is not an llmpy rendezvous of this version "
                                    "(another program on that port?)")
                if world != env.world:
                    raise UserError(f"rank {env.rank}: rank 0 at {addr}:{port} runs a job of {world} ranks but this "
                                    f"rank was started for {env.world}: the ranks' settings differ")
                return _recv_exact(s, n)
        except OSError as e:  # refused (rank 0 not listening yet), reset, timed out, name not resolvable yet
            last_err = e.strerror or str(e) or type(e).__name__
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(2 * delay, 1.0)


def _file_exchange(env: DistEnv, blob: bytes | None, path: str | None, timeout: float) -> bytes:
    if not path:
        raise UserError(f"file rendezvous needs a path ({ENV_RDZV_PATH} / --rdzv-path) on a file system that "
                        "every node shares")
    if not env.job_id:
        raise UserError(f"file rendezvous needs a job id that all ranks share and no earlier job used: set "
                        f"{ENV_JOB_ID} to the same new value for every rank (llmpy launch sets it on one node; "
                        "Slurm's job id is used under srun)")
    # MASTER_PORT joins the id so that two jobs told to share one job id but different ports stay apart.
    token = f"{env.job_id}@{env.master_port}"
    if env.rank == 0:
        doc = {"format": "llmpy-rendezvous", "version": 1, "job": token, "world": env.world, "id": blob.hex()}
        atomic_write_bytes(path, json.dumps(doc).encode())  # temp file + os.replace: never read half-written
        return blob
    deadline, delay, seen = time.monotonic() + timeout, 0.02, None
    while True:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            if doc.get("job") == token:
                if doc.get("world") != env.world:
                    raise UserError(f"rank {env.rank}: {path} is for {doc.get('world')} ranks of job {token}, this "
                                    f"rank was started for {env.world}")
                return bytes.fromhex(doc["id"])
            seen = doc.get("job")
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass  # not there yet, or not ours
        if time.monotonic() >= deadline:
            stale = f" (the file there is from job {seen}: stale)" if seen else ""
            raise UserError(f"rank {env.rank}: no rendezvous file for job {token} at {path} within {timeout:g} s"
                            f"{stale}; rank 0 may not be running, or the path is not on a file system all nodes "
                            "share")
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def _mpi_exchange(env: DistEnv, blob: bytes | None) -> bytes:
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("rendezvous over MPI needs mpi4py (pip install mpi4py, built against your MPI); or set "
                        f"MASTER_ADDR to rank 0's host and {ENV_RDZV}=tcp") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world or comm.Get_rank() != env.rank:
        raise UserError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the {env.source} environment says "
                        f"rank {env.rank} of {env.world}")
    # Buffer broadcasts (capital B): mpi4py's lower-case bcast pickles.
    head = bytearray(struct.pack("!I", len(blob))) if env.rank == 0 else bytearray(4)
    comm.Bcast([head, MPI.BYTE], root=0)
    (n,) = struct.unpack("!I", head)
    buf = bytearray(blob) if env.rank == 0 else bytearray(n)
    if n:
        comm.Bcast([buf, MPI.BYTE], root=0)
    return bytes(buf)


# ---------------------------------------------------------------------------------------------- watchdog

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


# ---------------------------------------------------------------------------------------------- ZeRO shards

def padded_size(n: int, world: int, align: int = 64) -> int:
    """n rounded up to a multiple of world*align: every rank's shard has padded_size // world elements, and every
    shard starts on an `align`-element boundary (vector loads, NCCL's alignment)."""
    if n < 0 or world < 1 or align < 1:
        raise ValueError(f"bad shard settings: n={n} world={world} align={align}")
    unit = world * align
    return -(-n // unit) * unit


def shard_range(n: int, rank: int, world: int, align: int = 64) -> tuple[int, int]:
    """[begin, end) of rank's shard of a flat buffer of n elements padded to padded_size(n, world, align).
    The last shards may lie partly or wholly in the padding (>= n)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    size = padded_size(n, world, align) // world
    return rank * size, (rank + 1) * size


def shard_pieces(offsets: dict[str, int], sizes: dict[str, int], begin: int,
                 end: int) -> list[tuple[str, int, int, int]]:
    """The parts of the named tensors of a flat buffer (tensor `name` = buffer[offsets[name]:+sizes[name]]) that
    fall in [begin, end), by offset: (name, tensor_begin, tensor_end, shard_begin), where tensor[tensor_begin:
    tensor_end] is shard[shard_begin:shard_begin + tensor_end - tensor_begin]. Gaps between tensors are skipped."""
    out = []
    for name in sorted(offsets, key=offsets.__getitem__):
        off = offsets[name]
        lo, hi = max(begin, off), min(end, off + sizes[name])
        if lo < hi:
            out.append((name, lo - off, hi - off, lo - begin))
    return out


# ---------------------------------------------------------------------------------------------- FakeComm

class FakeWorld:
    """What the FakeComms of one world share: a slot per rank and a barrier (threads of one process)."""

    def __init__(self, world: int, timeout: float = 10.0):
        self.world, self.timeout = world, timeout
        self.slots: list = [None] * world
        self.ops: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=timeout)


class FakeComm:
    """NCCL's collectives in NumPy for tests on the CPU: each rank is a thread holding FakeComm(rank, world).
    Reductions add in rank order (deterministic). A rank missing for `timeout` s makes every rank raise
    TimeoutError instead of hanging; ranks calling different collectives raise RuntimeError."""

    def __init__(self, rank: int, shared: FakeWorld):
        self.rank, self.world, self.shared = rank, shared.world, shared

    @classmethod
    def group(cls, world: int, timeout: float = 10.0) -> list["FakeComm"]:
        shared = FakeWorld(world, timeout)
        return [cls(r, shared) for r in range(world)]

    def _wait(self, op: str) -> None:
        try:
            self.shared.barrier.wait()
        except threading.BrokenBarrierError:
            raise TimeoutError(f"rank {self.rank}: {op} waited more than {self.shared.timeout:g} s for the other "
                               "ranks (one is missing or hung)") from None

    def _collective(self, op: str, x, compute: Callable[[list], object]):
        s = self.shared
        s.slots[self.rank], s.ops[self.rank] = x, op
        self._wait(op)
        if len(set(s.ops)) != 1:
            raise RuntimeError(f"rank {self.rank}: ranks called different collectives: {s.ops}")
        result = compute(list(s.slots))
        self._wait(op)  # nobody overwrites its input or slot before every rank has read them
        return result

    def _sum(self, arrays: list, sl: slice, op: str) -> np.ndarray:
        if op not in ("sum", "avg"):
            raise ValueError(f"unknown reduction {op!r}")
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"ranks passed different shapes: {[a.shape for a in arrays]}")
        out = np.array(arrays[0][sl], copy=True)
        for a in arrays[1:]:
            out += a[sl]
        if op == "avg":
            out /= self.world
        return out

    def all_reduce(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        """x = the sum (or mean) of every rank's x, in place."""
        x[...] = self._collective("all_reduce", x, lambda v: self._sum(v, slice(None), op))
        return x

    def reduce_scatter(self, x: np.ndarray, out: np.ndarray, op: str = "avg") -> np.ndarray:
        """out = this rank's shard (x.size // world elements) of the reduction of every rank's flat x."""
        L = out.size
        if x.size != L * self.world:
            raise ValueError(f"reduce_scatter: input has {x.size} elements, need world*shard = {self.world * L}")
        flat = x.reshape(-1)
        vals = self._collective("reduce_scatter", flat,
                                lambda v: self._sum(v, slice(self.rank * L, (self.rank + 1) * L), op))
        out.reshape(-1)[...] = vals
        return out

    def all_gather(self, shard: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = every rank's shard, concatenated in rank order."""
        if out.size != shard.size * self.world:
            raise ValueError(f"all_gather: output has {out.size} elements, need world*shard = "
                             f"{self.world * shard.size}")
        out.reshape(-1)[...] = self._collective("all_gather", shard.reshape(-1), np.concatenate)
        return out

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        x[...] = self._collective("broadcast", x, lambda v: np.array(v[root], copy=True))
        return x

    def barrier(self) -> None:
        self._collective("barrier", None, lambda v: None)
