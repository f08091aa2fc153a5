"""Handing NCCL's unique id from rank 0 to every rank (`exchange_id`): over TCP, a shared file, or MPI."""
from __future__ import annotations

import json
import socket
import struct
import time

from ..errors import UserError
from ..formats.atomic import atomic_write_bytes
from .env import ENV_JOB_ID, ENV_RDZV, ENV_RDZV_PATH, RDZV_METHODS, DistEnv

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
