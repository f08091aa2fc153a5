"""llmpy.distributed on the CPU: environments, rendezvous, watchdog; ZeRO shard math and the FakeComm test double."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from llmpy.backends import cpu as cpu_backend
from llmpy.backends.cpu import CPUBackend
from llmpy.data.loader import DataLoader
from llmpy.data.shards import write_shard
from fakes import FakeComm, padded_size, shard_pieces, shard_range
from llmpy.distributed.env import EXIT_CODE, DistEnv, dist_env, expand_nodelist, tasks_per_node
from llmpy.distributed.rendezvous import exchange_id
from llmpy.distributed.watchdog import Watchdog
from llmpy.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def denv(rank, world, port, **kw) -> DistEnv:
    return DistEnv(rank, world, rank, world, "127.0.0.1", port, "test", **kw)


def in_threads(fns, timeout=10.0):
    """Run fns concurrently; (results, exceptions) by index."""
    res, err = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
            res[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            err[i] = e
    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a rank hung"
    return res, err


# ---------------------------------------------------------------------------------------------- environment

def test_single_process_default():
    assert dist_env({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single", "", "tcp", None, 300.0)


def test_llmpy_variables_win_over_mpi_and_slurm():
    e = {"LLMPY_RANK": "3", "LLMPY_WORLD_SIZE": "8", "LLMPY_LOCAL_RANK": "1", "LLMPY_LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "LLMPY_RDZV": "file", "LLMPY_RDZV_PATH": "/shared/r",
         "LLMPY_TIMEOUT": "5", "LLMPY_JOB_ID": "j1", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
         "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "9"}
    assert dist_env(e) == DistEnv(3, 8, 1, 2, "10.0.0.1", 1234, "llmpy", "j1", "file", "/shared/r", 5.0)


def test_openmpi():
    e = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMI_RANK": "0", "PMI_SIZE": "1", "PMIX_NAMESPACE": "ns7"}
    d = dist_env(e)
    assert (d.rank, d.world, d.local_rank, d.local_world, d.source) == (5, 8, 1, 4, "openmpi")
    assert d.job_id == "pmix-ns7"
    assert d.rdzv == "mpi"  # several nodes and no MASTER_ADDR: only MPI knows where rank 0 is
    assert dist_env({**e, "MASTER_ADDR": "h0"}).rdzv == "tcp"
    assert dist_env({**e, "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}).rdzv == "tcp"


def test_mpich_and_pmi_under_srun():
    d = dist_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})
    assert (d.rank, d.world, d.local_rank, d.local_world, d.source) == (2, 4, 0, 2, "mpich")
    # srun --mpi=pmi2: PMI_* for the ranks, Slurm's variables for the node
    d = dist_env({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
                  "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[3-4]", "MASTER_PORT": "4000"})
    assert (d.rank, d.world, d.local_rank, d.local_world, d.source) == (3, 4, 1, 2, "mpich")
    assert (d.master_addr, d.master_port) == ("gpu3", 4000)


def test_slurm():
    e = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    d = dist_env(e)
    assert d == DistEnv(5, 8, 1, 4, "node01", 29500, "slurm", "slurm-77.0", "tcp", None, 300.0)
    assert dist_env({**e, "SLURM_STEP_ID": "1"}).job_id != d.job_id  # a second srun in the same job
    assert dist_env({**e, "MASTER_ADDR": "head"}).master_addr == "head"
    # the step's layout and node list come before the job's
    d = dist_env({**e, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_TASKS_PER_NODE": "3(x2)",
                  "SLURM_STEP_NODELIST": "a,b"})
    assert (d.world, d.local_world, d.master_addr) == (6, 3, "a")
    d = dist_env({k: v for k, v in e.items() if k != "SLURM_TASKS_PER_NODE"} | {"SLURM_NTASKS_PER_NODE": "4"})
    assert d.local_world == 4
    d = dist_env({**e, "SLURM_TASKS_PER_NODE": "5,3", "SLURM_NODELIST": "x", "SLURM_JOB_NODELIST": ""})
    assert (d.local_world, d.master_addr) == (3, "x")


def test_expand_nodelist_and_tasks_per_node():
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("a,b") == ["a", "b"]
    assert expand_nodelist("gpu[1-2]-ib,login") == ["gpu1-ib", "gpu2-ib", "login"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_nodelist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert tasks_per_node("4(x2),3") == [4, 4, 3]
    for bad in ("node[01-", "n[a-b]"):
        with pytest.raises(UserError, match="node list"):
            expand_nodelist(bad)
    with pytest.raises(UserError, match="tasks per node"):
        tasks_per_node("4x2")


@pytest.mark.parametrize("env, match", [
    ({"LLMPY_RANK": "4", "LLMPY_WORLD_SIZE": "4"}, "rank 4 of world size 4"),
    ({"LLMPY_RANK": "0"}, "LLMPY_WORLD_SIZE is not set"),
    ({"LLMPY_RANK": "x", "LLMPY_WORLD_SIZE": "2"}, "LLMPY_RANK='x' is not an integer"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "local rank 2 of 2"),
    ({"MASTER_PORT": "65535"}, "MASTER_PORT=65535"),
    ({"LLMPY_RDZV": "udp"}, "LLMPY_RDZV='udp'"),
    ({"LLMPY_TIMEOUT": "-1"}, "LLMPY_TIMEOUT must be > 0"),
])
def test_bad_environment(env, match):
    with pytest.raises(UserError, match=match):
        dist_env(env)


# ---------------------------------------------------------------------------------------------- rendezvous

def test_tcp_rendezvous_three_ranks_rank0_late():
    port, blob = free_port(), os.urandom(128)

    def rank0():
        time.sleep(0.2)  # the others are already knocking: they must retry
        return exchange_id(denv(0, 3, port), blob, timeout=5)
    res, err = in_threads([rank0] + [lambda r=r: exchange_id(denv(r, 3, port), None, timeout=5) for r in (1, 2)])
    assert err == [None] * 3
    assert res == [blob] * 3


def test_tcp_rendezvous_timeouts_are_quick_and_clear():
    port = free_port()
    t = time.monotonic()
    with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port}.*rank 0 may not be running"):
        exchange_id(denv(1, 3, port), None, timeout=0.3)
    with pytest.raises(UserError, match=r"only 1 of 3 ranks.*missing ranks 1, 2"):
        exchange_id(denv(0, 3, port), b"id", timeout=0.3)
    assert time.monotonic() - t < 3


def test_tcp_rendezvous_mismatched_world_fails_on_both_sides():
    port = free_port()
    res, err = in_threads([lambda: exchange_id(denv(0, 3, port), b"id", timeout=5),
                           lambda: exchange_id(denv(1, 2, port), None, timeout=5)])
    assert isinstance(err[0], UserError) and "this job has 3 ranks" in str(err[0])
    assert isinstance(err[1], UserError) and "job of 3 ranks" in str(err[1])


def test_tcp_rendezvous_port_taken_or_foreign():
    with socket.create_server(("", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on port {port}"):
            exchange_id(denv(0, 2, port), b"id", timeout=1)

        def foreign():  # a program that is not ours answers on the port
            conn, _ = busy.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        t = threading.Thread(target=foreign, daemon=True)
        t.start()
        with pytest.raises(UserError, match="not an llmpy rendezvous"):
            exchange_id(denv(1, 2, port), None, timeout=2)
        t.join(2)


def test_file_rendezvous_ignores_a_stale_file(tmp_path):
    path, port, blob = str(tmp_path / "rdzv.json"), 29999, os.urandom(128)
    with open(path, "w") as f:  # an earlier job's file, still there
        json.dump({"format": "llmpy-rendezvous", "version": 1, "job": f"old@{port}", "world": 3, "id": "00"}, f)

    def rank0():
        time.sleep(0.3)
        return exchange_id(denv(0, 3, port, job_id="new"), blob, method="file", path=path, timeout=5)
    others = [lambda r=r: exchange_id(denv(r, 3, port, job_id="new"), None, method="file", path=path, timeout=5)
              for r in (1, 2)]
    res, err = in_threads([rank0] + others)
    assert err == [None] * 3 and res == [blob] * 3


def test_file_rendezvous_errors(tmp_path):
    path = str(tmp_path / "rdzv.json")
    with open(path, "w") as f:
        json.dump({"job": "old@1", "world": 2, "id": "00"}, f)
    t = time.monotonic()
    with pytest.raises(UserError, match=r"no rendezvous file for job new@1 .*from job old@1: stale"):
        exchange_id(denv(1, 2, 1, job_id="new"), None, method="file", path=path, timeout=0.3)
    assert time.monotonic() - t < 2
    with pytest.raises(UserError, match="needs a job id"):
        exchange_id(denv(1, 2, 1), None, method="file", path=path, timeout=0.3)
    with pytest.raises(UserError, match="needs a path"):
        exchange_id(denv(1, 2, 1, job_id="x"), None, method="file", timeout=0.3)


def test_mpi_rendezvous(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed
    with pytest.raises(UserError, match="needs mpi4py"):
        exchange_id(denv(1, 2, 1), None, method="mpi")

    comms, local = FakeComm.group(3, timeout=5), threading.local()

    class World:  # MPI_COMM_WORLD as each thread sees it
        def Get_rank(self):
            return local.rank

        def Get_size(self):
            return 3

        def Bcast(self, spec, root=0):
            buf, kind = spec
            assert kind == "byte" and isinstance(buf, bytearray)
            comms[local.rank].broadcast(np.frombuffer(buf, np.uint8), root)
    mpi = types.SimpleNamespace(COMM_WORLD=World(), BYTE="byte")
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    blob = os.urandom(128)

    def rank(r):
        local.rank = r
        return exchange_id(denv(r, 3, 1), blob if r == 0 else None, method="mpi")
    res, err = in_threads([lambda r=r: rank(r) for r in range(3)])
    assert err == [None] * 3 and res == [blob] * 3


# ---------------------------------------------------------------------------------------------- watchdog

class Ranks:
    """Watchdogs of one world as threads of this process; exits are recorded instead of taken."""

    def __init__(self, world, timeout, ranks=None, **kw):
        kw.setdefault("startup_timeout", 10.0)  # a loaded machine may take seconds to start a process
        self.port, self.wport = free_port(), free_port()
        self.exits, self.aborted_hooks = [], []
        self.wd = {r: Watchdog(denv(r, world, self.port), timeout=timeout, port=self.wport,
                               on_abort=lambda r=r: self.aborted_hooks.append(r),
                               exit_fn=lambda code, r=r: self.exits.append((r, code)), **kw)
                   for r in (range(world) if ranks is None else ranks)}
        self.alive = {r: threading.Event() for r in self.wd}
        self.threads = []

    def start(self):
        for r in sorted(self.wd):
            self.wd[r].start()
            self.alive[r].set()
            t = threading.Thread(target=self._steps, args=(r,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _steps(self, r):  # a training loop calling progress() while alive[r] is set
        wd = self.wd[r]
        while wd.abort_reason is None and not wd._stop.is_set():
            if self.alive[r].is_set():
                wd.progress()
            time.sleep(0.02)

    def wait_aborted(self, ranks, limit):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(self.wd[r].abort_reason is None for r in ranks):
            time.sleep(0.01)
        return {r: self.wd[r].abort_reason for r in ranks}

    def stop(self):
        for wd in self.wd.values():
            wd.stop()


@pytest.mark.parametrize("hung", [1, 0])
def test_watchdog_a_rank_without_progress_stops_all(hung):
    rk = Ranks(3, timeout=0.6).start()
    try:
        assert all(rk.wd[r].ready.wait(3) for r in range(3))
        t = time.monotonic()
        rk.alive[hung].clear()  # stuck in a collective: the thread still beats, the loop does not move
        reasons = rk.wait_aborted(range(3), 3)
        took = time.monotonic() - t
    finally:
        rk.stop()
    assert re.fullmatch(r"no progress for \d+ s inside the training step", reasons[hung]), reasons
    for r in set(range(3)) - {hung}:
        assert reasons[r].startswith(f"rank {hung} reports no progress"), reasons
    assert sorted(rk.exits) == [(r, EXIT_CODE) for r in range(3)]
    assert sorted(rk.aborted_hooks) == [0, 1, 2]
    assert took < 0.6 + 1.0


_SUB_RANK = """
import sys, time
from llmpy.distributed.env import DistEnv
from llmpy.distributed.watchdog import Watchdog
rank, port, wport = (int(a) for a in sys.argv[1:4])
wd = Watchdog(DistEnv(rank, 3, rank, 3, "127.0.0.1", port, "test"), timeout=0.6, port=wport,
              startup_timeout=10).start()
print("started", flush=True)
while True:
    wd.progress()
    time.sleep(0.02)
"""


@pytest.mark.parametrize("sub, sig, expect", [
    (2, signal.SIGSTOP, "rank 2 stopped sending heartbeats"),
    (2, signal.SIGKILL, "rank 2's watchdog connection dropped (rank 2 died?)"),
    (0, signal.SIGSTOP, "rank 0's watchdog sent nothing for"),
    (0, signal.SIGKILL, "rank 0's watchdog connection dropped (rank 0 died?)"),
])
@pytest.mark.slow
def test_watchdog_dead_or_frozen_process(sub, sig, expect):
    """One rank is a real process that is frozen (SIGSTOP: no heartbeats, connection open) or killed."""
    rk = Ranks(3, timeout=0.6, ranks=[r for r in range(3) if r != sub])
    proc = subprocess.Popen([sys.executable, "-c", _SUB_RANK, str(sub), str(rk.port), str(rk.wport)], cwd=ROOT,
                            stdout=subprocess.PIPE)
    try:
        if sub == 0:
            assert proc.stdout.readline() == b"started\n"
        rk.start()
        assert all(rk.wd[r].ready.wait(5) for r in rk.wd)
        if sub != 0:
            deadline = time.monotonic() + 5  # rank 0 has heard the process's first heartbeat
            while len(rk.wd[0]._conns) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        t = time.monotonic()
        os.kill(proc.pid, sig)
        reasons = rk.wait_aborted(rk.wd, 3)
        took = time.monotonic() - t
    finally:
        rk.stop()
        proc.kill()
        os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
        proc.wait(5)
    assert all(reason and reason.startswith(expect) for reason in reasons.values()), reasons
    assert sorted(rk.exits) == [(r, EXIT_CODE) for r in rk.wd]
    # a drop is seen at once; silence after the timeout (heartbeat timing adds up to one interval)
    assert took < (0.5 if sig == signal.SIGKILL else 0.6 + 1.0)


@pytest.mark.slow
def test_watchdog_clean_stop_aborts_nobody():
    rk = Ranks(3, timeout=0.4).start()
    try:
        assert all(rk.wd[r].ready.wait(3) for r in range(3))
        rk.alive[2].clear()
        rk.wd[2].stop()   # rank 2 finished first: no more heartbeats nor progress from it
        time.sleep(1.0)
        rk.wd[0].stop()   # then rank 0: its monitor goes away
        time.sleep(1.0)   # rank 1 keeps working after both are gone
        assert rk.wd[1].abort_reason is None
    finally:
        rk.stop()
    assert rk.exits == [] and all(wd.abort_reason is None for wd in rk.wd.values())


def test_watchdog_ready_when_a_rank_finished_before_the_last_joined():
    rk = Ranks(3, timeout=2)
    try:
        rk.wd[0].start()
        rk.wd[1].start()
        assert rk.wd[1].ready.wait(3)
        rk.wd[1].progress()
        rk.wd[1].stop()  # done before rank 2 even started
        time.sleep(0.1)
        assert not rk.wd[0].ready.is_set()
        rk.wd[2].start()
        assert rk.wd[0].ready.wait(3)
    finally:
        rk.stop()
    assert rk.exits == []


def test_watchdog_startup_failures_and_world_of_one():
    rk = Ranks(2, timeout=5, ranks=[1], startup_timeout=0.3).start()  # rank 0 never comes
    solo = Ranks(1, timeout=0.3, startup_timeout=None).start()
    assert solo.wd[0].startup_timeout == 600  # the first step may compile kernels for minutes
    try:
        reasons = rk.wait_aborted([1], 3)
        solo.alive[0].clear()
        solo_reason = solo.wait_aborted([0], 3)[0]
    finally:
        rk.stop()
        solo.stop()
    assert reasons[1].startswith(f"cannot reach rank 0's watchdog at 127.0.0.1:{rk.wport} within 0.3 s")
    assert re.fullmatch(r"no progress for \d+ s inside the training step", solo_reason)
    assert rk.exits == [(1, EXIT_CODE)] and solo.exits == [(0, EXIT_CODE)]


def test_watchdog_exits_even_if_on_abort_hangs():
    release, exits = threading.Event(), []
    wd = Watchdog(denv(0, 1, 1), timeout=0.2, on_abort=lambda: release.wait(5), exit_fn=exits.append,
                  startup_timeout=0.2).start()
    t = time.monotonic()
    try:
        while not exits and time.monotonic() - t < 3:
            time.sleep(0.01)
    finally:
        release.set()
        wd.stop()
    assert exits == [EXIT_CODE]
    assert time.monotonic() - t < 1.5  # 0.2 s to notice + at most 0.2 s for on_abort
    assert wd.abort_reason.startswith("no progress for 0 s before the first step")


# ---------------------------------------------------------------------------------------------- ZeRO shards

def test_padded_size_and_shard_range():
    assert padded_size(100, 3, 8) == 120 and shard_range(100, 2, 3, 8) == (80, 120)
    assert padded_size(0, 4) == 0 and shard_range(0, 3, 4) == (0, 0)
    for n in (1, 63, 64, 1000, 12345):
        for world in (1, 2, 3, 8):
            for align in (1, 4, 64):
                P = padded_size(n, world, align)
                assert P % (world * align) == 0 and n <= P < n + world * align
                ranges = [shard_range(n, r, world, align) for r in range(world)]
                assert ranges[0][0] == 0 and ranges[-1][1] == P
                assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                assert len({e - b for b, e in ranges}) == 1 and all(b % align == 0 for b, _ in ranges)
    with pytest.raises(ValueError):
        shard_range(10, 3, 3)


def test_shard_pieces_cover_each_tensor_element_once():
    rng = np.random.default_rng(0)
    sizes = {f"t{i}": int(rng.integers(1, 40)) for i in range(7)}
    offsets, off = {}, 0
    for name in sorted(sizes, key=lambda k: rng.random()):  # buffer order differs from the dict's
        offsets[name] = off
        off += sizes[name] + int(rng.integers(0, 5))  # gaps, as alignment leaves
    n, world, align = off, 3, 4
    owner = -np.ones(padded_size(n, world, align), int)  # buffer position -> shard that covers it
    for r in range(world):
        b, e = shard_range(n, r, world, align)
        for name, tb, te, sb in shard_pieces(offsets, sizes, b, e):
            assert 0 <= tb < te <= sizes[name] and 0 <= sb and sb + te - tb <= e - b
            pos = np.arange(offsets[name] + tb, offsets[name] + te)
            assert np.all(pos == b + sb + np.arange(te - tb))  # shard position maps back to the buffer position
            assert np.all(owner[pos] == -1)
            owner[pos] = r
    for name in sizes:
        assert np.all(owner[offsets[name]:offsets[name] + sizes[name]] >= 0)
    covered = np.zeros(len(owner), bool)
    for name in sizes:
        covered[offsets[name]:offsets[name] + sizes[name]] = True
    assert np.all(owner[~covered] == -1)  # gaps and padding belong to no piece


# ---------------------------------------------------------------------------------------------- FakeComm

def test_fake_comm_collectives():
    world = 3
    comms = FakeComm.group(world, timeout=5)
    data = [np.random.default_rng(r).standard_normal(12).astype(np.float32) for r in range(world)]

    def rank(r):
        c = comms[r]
        s = data[r].copy()
        c.all_reduce(s, "sum")
        a = data[r].copy()
        c.all_reduce(a, "avg")
        sh = np.full(4, np.nan, np.float32)
        c.reduce_scatter(data[r].copy(), sh, "sum")
        g = np.full(12, np.nan, np.float32)
        c.all_gather(np.full(4, r, np.float32), g)
        b = np.full(5, r, np.float32)
        c.broadcast(b, root=2)
        c.barrier()
        return s, a, sh, g, b
    res, err = in_threads([lambda r=r: rank(r) for r in range(world)])
    assert err == [None] * world
    total = data[0] + data[1] + data[2]
    for r, (s, a, sh, g, b) in enumerate(res):
        np.testing.assert_array_equal(s, total)
        np.testing.assert_array_equal(a, total / 3)
        np.testing.assert_array_equal(sh, total[4 * r:4 * r + 4])
        np.testing.assert_array_equal(g, np.repeat(np.arange(3, dtype=np.float32), 4))
        np.testing.assert_array_equal(b, np.full(5, 2, np.float32))


def test_fake_comm_missing_rank_and_mismatch_raise():
    comms = FakeComm.group(2, timeout=0.2)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 0: all_reduce waited"):
        comms[0].all_reduce(np.zeros(3))
    assert time.monotonic() - t < 2
    comms = FakeComm.group(2, timeout=5)
    res, err = in_threads([lambda: comms[0].all_reduce(np.zeros(3)), lambda: comms[1].barrier()])
    assert all(isinstance(e, RuntimeError) and "different collectives" in str(e) for e in err)


def _flat_layout(sizes, align):
    offsets, off = {}, 0
    for name, size in sizes.items():
        offsets[name] = off
        off = -(-(off + size) // align) * align
    return offsets, off


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_zero1_equals_allreduce_then_adamw(clip):
    """ZeRO-1: reduce-scatter the gradients, AdamW on this rank's shard with sharded moments, all-gather the
    weights == all-reduce and AdamW on every replica. Without clipping bitwise; with clipping the norm is summed
    in another order, so to rounding."""
    world, align, steps = 3, 8, 3
    sizes = {"wte": 50, "ln1w": 7, "fcw": 33, "fcb": 9}
    decayed = {"wte", "fcw"}
    offsets, n = _flat_layout(sizes, align)
    P = padded_size(n, world, align)
    rng = np.random.default_rng(1)
    inside = np.zeros(P, bool)
    for name in sizes:
        inside[offsets[name]:offsets[name] + sizes[name]] = True
    p0 = np.where(inside, rng.standard_normal(P), 0).astype(np.float32)
    grads = [[np.where(inside, rng.standard_normal(P), 0).astype(np.float32) for _ in range(world)]
             for _ in range(steps)]
    comms = FakeComm.group(world, timeout=10)

    def hp_at(t):
        b1, b2 = 0.9, 0.95
        return np.array([1e-2, b1, b2, 1e-8, 1 / (1 - b1 ** t), 1 / (1 - b2 ** t), clip, 0], np.float32)

    def rank(r):
        c, be = comms[r], CPUBackend()
        be.ws = np.empty(3 * max(P, getattr(cpu_backend, "BLOCK", 0)), np.float32)  # AdamW's scratch
        b, e = shard_range(n, r, world, align)
        L = e - b
        ref_p, ref_m, ref_v = p0.copy(), np.zeros(P, np.float32), np.zeros(P, np.float32)
        p, m, v = p0.copy(), np.zeros(L, np.float32), np.zeros(L, np.float32)  # moments: this shard only
        g_shard, norms = np.empty(L, np.float32), []
        for t in range(1, steps + 1):
            hp = hp_at(t)
            # the replicated way
            g = c.all_reduce(grads[t - 1][r].copy(), "avg")
            ref_norm = np.array([np.sqrt(np.sum(g.astype(np.float64) ** 2))])
            for name, size in sizes.items():
                o = offsets[name]
                be.adamw(ref_p[o:o + size], None, g[o:o + size], ref_m[o:o + size], ref_v[o:o + size], hp,
                         ref_norm, 0.1 if name in decayed else 0.0, o)
            # ZeRO-1
            c.reduce_scatter(grads[t - 1][r], g_shard, "avg")
            sq = np.array([np.sum(g_shard.astype(np.float64) ** 2)])
            norm = np.sqrt(c.all_reduce(sq, "sum"))
            norms.append((norm[0], ref_norm[0]))
            p_shard = p[b:e].copy()
            for name, tb, te, sb in shard_pieces(offsets, sizes, b, e):
                k = slice(sb, sb + te - tb)
                be.adamw(p_shard[k], None, g_shard[k], m[k], v[k], hp, norm, 0.1 if name in decayed else 0.0,
                         offsets[name] + tb)
            c.all_gather(p_shard, p)
        return ref_p, p, norms
    res, err = in_threads([lambda r=r: rank(r) for r in range(world)], timeout=20)
    assert err == [None] * world, err
    for ref_p, p, norms in res:
        np.testing.assert_array_equal(ref_p, res[0][0])  # replicas agree
        assert not np.array_equal(ref_p, p0)              # and something was updated
        if clip == 0:
            np.testing.assert_array_equal(p, ref_p)
        else:
            assert all(nm > clip for nm, _ in norms)      # the clipping path ran
            np.testing.assert_allclose([a for a, _ in norms], [b for _, b in norms], rtol=1e-12)
            np.testing.assert_allclose(p, ref_p, rtol=1e-6, atol=1e-7)
        assert np.all(p[~inside] == 0)                    # gaps and padding stay untouched


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_rank_batches_tile_the_world_batch(tmp_path, shuffle):
    rng = np.random.default_rng(2)
    for k, ntok in enumerate((1000, 777)):
        write_shard(tmp_path / f"d_train_{k:06d}.bin", rng.integers(0, 50257, ntok))
    pattern, B, T, R = str(tmp_path / "d_train_*.bin"), 2, 8, 3
    ranks = [DataLoader(pattern, B, T, rank=r, world=R, shuffle=shuffle, seed=5) for r in range(R)]
    whole = DataLoader(pattern, B * R, T, shuffle=shuffle, seed=5)
    assert {ld.num_batches_per_epoch for ld in ranks} == {whole.num_batches_per_epoch} == {20 + 16}
    for _ in range(40):  # across the shard boundary and into the second epoch
        parts = [tuple(a.copy() for a in ld.next_batch()) for ld in ranks]
        x, y = whole.next_batch()
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
        assert not np.array_equal(parts[0][0], parts[1][0])
