"""`llmpy launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A] -- train ...`: one process per GPU.

Each child runs `python -m llmpy <command>` with the variables `llmpy.distributed.dist_env` reads: LLMPY_RANK,
LLMPY_WORLD_SIZE, LLMPY_LOCAL_RANK, LLMPY_LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LLMPY_RDZV, LLMPY_TIMEOUT
(+ LLMPY_RDZV_PATH, LLMPY_JOB_ID), and NCCL_NVLS_ENABLE=0 always. Rank 0 writes to this terminal unchanged (its
progress bar works); other ranks' lines are prefixed "[rank r] " (--quiet-others drops their stdout, never their
stderr: that is where their errors go). When a child fails, the others get SIGTERM, SIGKILL after --grace s, and
the launcher exits with the failed child's status. Ctrl-C / SIGTERM reach each child once (children run in their
own process groups, so the terminal's Ctrl-C does not reach them twice); a third one kills them.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

from .env import (DEFAULT_PORT, DEFAULT_TIMEOUT, ENV_JOB_ID, ENV_LOCAL_RANK, ENV_LOCAL_WORLD, ENV_RANK,
                          ENV_RDZV, ENV_RDZV_PATH, ENV_TIMEOUT, ENV_WORLD, EXIT_CODE, force_nccl_settings)
from ..errors import UserError

POLL_S = 0.05
MAX_PROCESSES = 1024  # processes on one node: far past any node's GPUs; more would only exhaust its memory


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "launch", help="start N training processes per node (data parallel over NCCL)",
        usage="llmpy launch --nproc-per-node N [options] -- train [train options]",
        description="Start one llmpy process per GPU. On several nodes run it once per node with the same "
        "--nnodes/--master-addr/--master-port and each node's --node-rank (or skip it: srun and mpirun "
        "are understood directly).")
    a = p.add_argument
    a("--nproc-per-node", type=int, default=1, metavar="N", help="processes on this node, usually its GPUs "
      "(%(default)s)")
    a("--nnodes", type=int, default=1, metavar="M", help="nodes in the job (%(default)s)")
    a("--node-rank", type=int, default=0, metavar="R", help="this node's index, 0..M-1 (%(default)s)")
    a("--master-addr", metavar="A", help="node 0's address (default: 127.0.0.1 on one node, else $MASTER_ADDR)")
    a("--master-port", type=int, metavar="P", help=f"rendezvous port on node 0; the watchdog uses P+1 (default "
      f"$MASTER_PORT or {DEFAULT_PORT})")
    a("--rdzv", choices=["tcp", "file", "mpi"], default="tcp", help="how rank 0 hands out NCCL's id: tcp (default) "
      "or file (--rdzv-path on a shared file system); mpi only under mpirun/srun, without this launcher")
    a("--rdzv-path", metavar="PATH", help="the rendezvous file for --rdzv file (default: none; needed there)")
    a("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
      help="seconds to wait for the other ranks, and before a hung rank stops the job (%(default)g)")
    a("--grace", type=float, default=10.0, metavar="S",
      help="after a rank fails, seconds between SIGTERM and SIGKILL for the others (%(default)g)")
    a("--quiet-others", action="store_true", help="drop the stdout of ranks other than 0")
    # not "command": cli.py's subparsers store the subcommand's name there
    a("child_argv", nargs=argparse.REMAINDER, metavar="COMMAND", help="the llmpy command every rank runs, after --")
    p.set_defaults(func=launch)
    return p


def _plan(args) -> tuple[list[str], dict[str, str], list[str]]:
    """Validated (command, environment shared by all children, notes to print)."""
    cmd = list(args.child_argv)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    n, m, r = args.nproc_per_node, args.nnodes, args.node_rank
    if not 1 <= n <= MAX_PROCESSES:
        raise UserError(f"--nproc-per-node must be 1..{MAX_PROCESSES} (one process per GPU), got {n}")
    if m < 1:
        raise UserError(f"--nnodes must be >= 1, got {m}")
    if not 0 <= r < m:
        raise UserError(f"--node-rank must be in 0..{m - 1} for --nnodes {m}, got {r}")
    if not cmd:
        raise UserError("nothing to launch: give the llmpy command after --, e.g. "
                        "llmpy launch --nproc-per-node 8 -- train --init d12")
    if cmd[0] == "launch":
        raise UserError("the command after -- is run by every rank; it cannot be another launch")
    # one node: always this machine, whatever an exported MASTER_ADDR from another job says
    addr = args.master_addr or (os.environ.get("MASTER_ADDR") if m > 1 else None) or "127.0.0.1"
    port = args.master_port
    if port is None:
        try:
            port = int(os.environ.get("MASTER_PORT") or DEFAULT_PORT)
        except ValueError:
            raise UserError(f"MASTER_PORT={os.environ['MASTER_PORT']!r} is not a port number") from None
    if not 1 <= port <= 65534:
        raise UserError(f"--master-port must be in 1..65534 (the watchdog uses the next port), got {port}")
    if m > 1 and (addr.startswith("127.") or addr in ("localhost", "::1")):
        raise UserError(f"--master-addr must be node 0's address reachable from every node when --nnodes > 1 "
                        f"(got {addr})")
    if not args.timeout > 0 or not args.grace >= 0:
        raise UserError(f"--timeout must be > 0 and --grace >= 0 seconds (got {args.timeout}, {args.grace})")
    if args.rdzv == "mpi":
        raise UserError("--rdzv mpi needs processes started by mpirun or srun (they are MPI ranks; these would not "
                        "be): run `mpirun ... python -m llmpy train ...` without llmpy launch, or use --rdzv tcp")
    env = dict(os.environ)
    notes = [note] if (note := force_nccl_settings(env)) else []
    env.update({ENV_WORLD: str(n * m), ENV_LOCAL_WORLD: str(n), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
                ENV_RDZV: args.rdzv, ENV_TIMEOUT: f"{args.timeout:g}"})
    env.pop(ENV_RDZV_PATH, None)
    if args.rdzv == "file":
        if not args.rdzv_path:
            raise UserError("--rdzv file needs --rdzv-path PATH on a file system that every node shares")
        path = os.path.abspath(os.path.expanduser(args.rdzv_path))
        if not os.path.isdir(os.path.dirname(path)):
            raise UserError(f"--rdzv-path {args.rdzv_path}: folder {os.path.dirname(path)} does not exist")
        env[ENV_RDZV_PATH] = path
        if not env.get(ENV_JOB_ID):
            if m > 1:  # launchers on different nodes cannot make up the same id
                raise UserError(f"--rdzv file on several nodes needs {ENV_JOB_ID} set to the same new value on every "
                                f"node (a file left by an earlier job must not be mistaken for this job's)")
            env[ENV_JOB_ID] = uuid.uuid4().hex
    return cmd, env, notes


def _child_setup(parent: int, prctl) -> None:  # in the child, between fork and exec
    if prctl is not None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a launcher killed with SIGKILL leaves no orphans behind
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _prctl():
    """libc's prctl, looked up in the parent (dlopen in a forked child could deadlock), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


def _pump(stream, prefix: bytes, out, lock: threading.Lock) -> None:
    """Copy a child's output line by line, each line prefixed."""
    sink = getattr(out, "buffer", None)
    for line in iter(stream.readline, b""):
        if not line.endswith(b"\n"):
            line += b"\n"
        with lock:
            try:
                if sink is not None:
                    sink.write(prefix + line)
                else:
                    out.write((prefix + line).decode(errors="replace"))
                out.flush()
            except (OSError, ValueError):
                pass  # our output is gone (`| head`): keep reading, or the child blocks on a full pipe
    stream.close()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}" + (" (its watchdog stopped it)" if code == EXIT_CODE else "")


def _signal_all(procs, sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # the child's group: whatever it started goes too
            except (ProcessLookupError, PermissionError):
                pass


def launch(args, *, program: list[str] | None = None) -> int:
    """Run the ranks of this node and wait for them; returns the exit status for the launcher. `program` replaces
    `[sys.executable, "-m", "llmpy"]` (tests run a small script instead)."""
    cmd, env, notes = _plan(args)
    n, node = args.nproc_per_node, args.node_rank
    program = [sys.executable, "-m", "llmpy"] if program is None else list(program)
    for note in notes:
        print(f"llmpy launch: note: {note}", file=sys.stderr, flush=True)
    procs: list[subprocess.Popen] = []
    ranks = [node * n + i for i in range(n)]
    setup = functools.partial(_child_setup, os.getpid(), _prctl())
    try:
        for i, rank in enumerate(ranks):
            child_env = dict(env, **{ENV_RANK: str(rank), ENV_LOCAL_RANK: str(i)})
            if rank != 0:
                child_env.setdefault("PYTHONUNBUFFERED", "1")  # prefixed lines as they come, not at exit
            piped = subprocess.PIPE if rank != 0 else None
            procs.append(subprocess.Popen(
                program + cmd, env=child_env, stdin=subprocess.DEVNULL,
                stdout=(subprocess.DEVNULL if args.quiet_others else piped) if rank != 0 else None, stderr=piped,
                process_group=0, preexec_fn=setup))
    except OSError as e:
        _signal_all(procs, signal.SIGKILL)
        for p in procs:
            p.wait()
        raise UserError(f"cannot start {program[0]}: {e.strerror or e}") from None
    # Threads only after every fork: a fork while another thread holds a lock can deadlock the child.
    lock, pumps = threading.Lock(), []
    for rank, p in zip(ranks, procs):
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            if stream is not None:
                pumps.append(threading.Thread(target=_pump, args=(stream, f"[rank {rank}] ".encode(), out, lock),
                                              daemon=True))
                pumps[-1].start()
    return _supervise(procs, ranks, args, pumps)


def _supervise(procs, ranks, args, pumps) -> int:
    got: list[int] = []  # signals received by the launcher

    def forward(signum, frame):
        got.append(signum)
        if len(got) == 1:
            print(f"llmpy launch: passing {signal.Signals(signum).name} to {len(procs)} rank(s) "
                  "(a third signal kills them)", file=sys.stderr, flush=True)
        _signal_all(procs, signal.SIGKILL if len(got) >= 3 else signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    failed: tuple[int, int] | None = None
    escalate: list[tuple[float, int]] = []  # (when, signal) still to send to the ranks left
    first_abort = None  # when a rank was first seen stopped by its watchdog
    try:
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            if failed is None and not got:
                bad = [(r, c) for r, c in zip(ranks, codes) if c not in (None, 0)]
                causes = [b for b in bad if b[1] != EXIT_CODE]
                if bad and not causes and first_abort is None:
                    first_abort = now
                # Name the cause, not a rank its watchdog stopped because of it: a rank that died can become
                # waitable after the others noticed, so watchdog exits alone get a second for a cause to appear.
                if causes or (bad and (now - first_abort >= 1.0 or all(c is not None for c in codes))):
                    failed = (causes or bad)[0]
                    alive = sum(c is None for c in codes)
                    print(f"llmpy launch: rank {failed[0]} {_describe(failed[1])}; stopping the other {alive} "
                          "rank(s)", file=sys.stderr, flush=True)
                    _signal_all(procs, signal.SIGTERM)
                    escalate = [(now + args.grace, signal.SIGKILL)]
            elif got and not escalate and any(c is not None for c in codes):
                # after Ctrl-C the ranks stop at a step boundary; one left waiting for a peer that is gone is
                # stopped after --timeout rather than waited for forever
                escalate = [(now + args.timeout, signal.SIGTERM), (now + args.timeout + args.grace, signal.SIGKILL)]
            if all(c is not None for c in codes):
                break
            while escalate and now >= escalate[0][0]:
                _signal_all(procs, escalate.pop(0)[1])
            time.sleep(POLL_S)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for t in pumps:
            t.join(timeout=2.0)
    if failed is not None:
        code = failed[1]
        return code if code > 0 else 128 - code
    if got:
        return 128 + got[0]
    return 0
