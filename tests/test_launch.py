"""llmpy launch: argument checks, the children's environment and output, failure handling, signals."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from llmpy.distributed.env import EXIT_CODE
from llmpy.errors import UserError
from llmpy.distributed.launch import add_launch_parser, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["LLMPY_RANK", "LLMPY_WORLD_SIZE", "LLMPY_LOCAL_RANK", "LLMPY_LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "LLMPY_RDZV", "LLMPY_RDZV_PATH", "LLMPY_TIMEOUT", "LLMPY_JOB_ID", "NCCL_NVLS_ENABLE"]

# The child program: what it does is its first argument.
CHILD = """
import json, os, signal, sys, time
rank, mode = int(os.environ["LLMPY_RANK"]), sys.argv[1]
folder = sys.argv[2] if len(sys.argv) > 2 else "."
def mark(name, text=""):
    with open(os.path.join(folder, f"{name}{rank}.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(folder, f"{name}{rank}.tmp"), os.path.join(folder, f"{name}{rank}"))
if mode == "env":
    # whole lines in one write each: rank 0's output is not split into lines by the launcher, and print under
    # PYTHONUNBUFFERED writes the text and the newline apart, so another rank's line could land between them
    os.write(1, (json.dumps({k: os.environ.get(k) for k in %r}) + "\\n").encode())
    os.write(2, f"complaint {rank}\\n".encode())
    if rank:  # a last line without a newline (rank 0's would run into the next rank's line: it is not split)
        sys.stdout.write(f"unfinished {rank}")
    sys.exit(0)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "trap":
    got = []
    def on_int(s, f):
        got.append(s)
        mark("sig", str(len(got)))
    signal.signal(signal.SIGINT, on_int)
mark("pid", str(os.getpid()))
if mode == "cause-late" and rank == 2:  # a watchdog exit shows up before the failure that caused it
    mark("gone")
    sys.exit(75)
if mode == "cause-late" and rank == 1:
    while not os.path.exists(os.path.join(folder, "gone2")):
        time.sleep(0.01)
    time.sleep(0.3)
    sys.exit(3)
if mode in ("fail", "stubborn") and rank == 1:
    while not all(os.path.exists(os.path.join(folder, f"pid{r}")) for r in (0, 2)):
        time.sleep(0.01)
    sys.exit(int(sys.argv[3]))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if mode == "trap" and got:
        time.sleep(0.5)  # long enough for a duplicate SIGINT to arrive and be counted
        sys.exit(0)
    time.sleep(0.01)
""" % KEYS

DRIVER = """
import argparse, sys
from llmpy.distributed.launch import add_launch_parser, launch
ap = argparse.ArgumentParser()
add_launch_parser(ap.add_subparsers())
sys.exit(launch(ap.parse_args(["launch"] + sys.argv[2:]), program=[sys.executable, sys.argv[1]]))
"""


def parse(argv):
    ap = argparse.ArgumentParser()
    add_launch_parser(ap.add_subparsers(dest="command"))  # the same dest as cli.py's
    args = ap.parse_args(["launch"] + argv)
    assert args.command == "launch"
    return args


@pytest.fixture
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return [sys.executable, str(path)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped
    except FileNotFoundError:
        return False


def wait_files(folder, names, limit=5.0):
    deadline = time.monotonic() + limit
    while not all((folder / n).exists() for n in names):
        assert time.monotonic() < deadline, f"children did not write {names}"
        time.sleep(0.01)


@pytest.mark.parametrize("argv, match", [
    (["--nproc-per-node", "0", "--", "train"], "--nproc-per-node must be 1..1024"),
    (["--nnodes", "0", "--", "train"], "--nnodes must be >= 1"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1", "--", "train"],
     r"--node-rank must be in 0\.\.1"),
    (["--nproc-per-node", "2"], "nothing to launch"),
    (["--nproc-per-node", "2", "--"], "nothing to launch"),
    (["--master-port", "65535", "--", "train"], "--master-port must be in 1..65534"),
    (["--nnodes", "2", "--", "train"], "--master-addr must be node 0's address"),
    (["--rdzv", "file", "--", "train"], "--rdzv file needs --rdzv-path"),
    (["--rdzv", "file", "--rdzv-path", "/no/such/dir/r.json", "--", "train"], "folder /no/such/dir does not exist"),
    (["--rdzv", "mpi", "--", "train"], "--rdzv mpi needs processes started by mpirun"),
    (["--timeout", "0", "--", "train"], "--timeout must be > 0"),
    (["--grace", "-1", "--", "train"], "--grace >= 0"),
    (["--", "launch", "--", "train"], "cannot be another launch"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--rdzv", "file", "--rdzv-path", "/tmp/r", "--", "train"],
     "needs LLMPY_JOB_ID"),
])
def test_bad_arguments(argv, match, monkeypatch, child):
    monkeypatch.delenv("LLMPY_JOB_ID", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match=match):
        launch(parse(argv), program=child)


@pytest.mark.parametrize("node", [0, 1])
def test_children_environment_and_output(node, child, capfd, monkeypatch, tmp_path):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")  # must be overridden
    monkeypatch.setenv("MASTER_ADDR", "elsewhere")  # left over from another job: one node ignores it
    monkeypatch.delenv("LLMPY_JOB_ID", raising=False)
    argv = ["--nproc-per-node", "3", "--master-port", "31000", "--timeout", "42"]
    if node:
        argv += ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3"]
    else:
        argv += ["--rdzv", "file", "--rdzv-path", str(tmp_path / "rdzv.json")]
    assert launch(parse(argv + ["--", "env"]), program=child) == 0
    out, err = capfd.readouterr()
    ranks = [3 * node + i for i in range(3)]
    seen = {}
    for line in out.splitlines():
        prefix, _, rest = line.partition("] ") if line.startswith("[rank ") else ("", "", line)
        if rest.startswith("{"):
            d = json.loads(rest)
            seen[int(d["LLMPY_RANK"])] = d
            assert (prefix == "") == (int(d["LLMPY_RANK"]) == 0)  # only rank 0 unprefixed
            assert prefix in ("", f"[rank {d['LLMPY_RANK']}")
    assert sorted(seen) == ranks
    for i, r in enumerate(ranks):
        d = seen[r]
        assert (d["LLMPY_WORLD_SIZE"], d["LLMPY_LOCAL_RANK"], d["LLMPY_LOCAL_WORLD_SIZE"]) == (str(6 if node else 3),
                                                                                               str(i), "3")
        assert (d["MASTER_PORT"], d["LLMPY_TIMEOUT"], d["NCCL_NVLS_ENABLE"]) == ("31000", "42", "0")
        assert d["MASTER_ADDR"] == ("10.1.2.3" if node else "127.0.0.1")
        if node:
            assert (d["LLMPY_RDZV"], d["LLMPY_RDZV_PATH"], d["LLMPY_JOB_ID"]) == ("tcp", None, None)
        else:  # the file rendezvous gets an absolute path and a job id that all ranks share
            assert (d["LLMPY_RDZV"], d["LLMPY_RDZV_PATH"]) == ("file", str(tmp_path / "rdzv.json"))
            assert d["LLMPY_JOB_ID"] and d["LLMPY_JOB_ID"] == seen[0]["LLMPY_JOB_ID"]
    for r in ranks:
        tag = "" if r == 0 else f"[rank {r}] "
        assert f"{tag}complaint {r}\n" in err.replace("\r", "")
        if r:
            assert f"{tag}unfinished {r}\n" in out
    assert "NCCL_NVLS_ENABLE=1 overridden to 0" in err


def test_quiet_others_keeps_their_stderr(child, capfd):
    assert launch(parse(["--nproc-per-node", "3", "--quiet-others", "--", "env"]), program=child) == 0
    out, err = capfd.readouterr()
    assert "[rank" not in out and '"LLMPY_RANK": "0"' in out
    assert "[rank 1] complaint 1" in err and "[rank 2] complaint 2" in err


def test_default_program_is_llmpy(capfd, monkeypatch):
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # rank 0's line in one write (see CHILD)
    assert launch(parse(["--nproc-per-node", "2", "--", "--version"])) == 0
    out, _ = capfd.readouterr()
    from llmpy import __version__
    assert f"\nllmpy {__version__}\n" in f"\n{out}" and f"[rank 1] llmpy {__version__}\n" in out


@pytest.mark.parametrize("mode, grace", [("fail", 10.0), ("stubborn", 0.3)])
def test_a_failing_child_stops_the_others(mode, grace, child, tmp_path, capfd):
    """Rank 1 exits with 3 while the others run; they get SIGTERM (stubborn ones SIGKILL after the grace)."""
    t = time.monotonic()
    code = launch(parse(["--nproc-per-node", "3", "--grace", str(grace), "--", mode, str(tmp_path), "3"]),
                  program=child)
    took = time.monotonic() - t
    assert code == 3
    assert took < 5
    _, err = capfd.readouterr()
    assert "llmpy launch: rank 1 exited with code 3; stopping the other 2 rank(s)" in err
    for r in (0, 2):
        assert not alive(int((tmp_path / f"pid{r}").read_text()))


def test_the_cause_is_named_not_the_watchdog_exit(child, tmp_path, capfd):
    code = launch(parse(["--nproc-per-node", "3", "--", "cause-late", str(tmp_path)]), program=child)
    assert code == 3
    assert "llmpy launch: rank 1 exited with code 3; stopping the other" in capfd.readouterr().err


@pytest.mark.slow
def test_watchdog_exit_code_is_named(child, tmp_path, capfd):
    code = launch(parse(["--nproc-per-node", "3", "--", "fail", str(tmp_path), str(EXIT_CODE)]), program=child)
    assert code == EXIT_CODE
    assert "rank 1 exited with code 75 (its watchdog stopped it)" in capfd.readouterr().err


def _start_driver(child, tmp_path, mode):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # its own session, as a terminal's foreground job: a signal to the group is what Ctrl-C sends
    return subprocess.Popen([sys.executable, str(driver), child[1], "--nproc-per-node", "3", "--", mode,
                             str(tmp_path)], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False])
def test_ctrl_c_reaches_each_child_once(to_group, child, tmp_path):
    """Ctrl-C in a terminal signals the launcher's whole process group; scancel or a supervisor may signal only
    the launcher. Either way each rank sees one SIGINT (a second one would make training stop at once)."""
    launcher = _start_driver(child, tmp_path, "trap")
    try:
        wait_files(tmp_path, [f"pid{r}" for r in range(3)])
        (os.killpg if to_group else os.kill)(launcher.pid, signal.SIGINT)
        code = launcher.wait(5)
    finally:
        launcher.kill()
    assert code == 128 + signal.SIGINT
    assert [(tmp_path / f"sig{r}").read_text() for r in range(3)] == ["1", "1", "1"]
    assert b"passing SIGINT to 3 rank(s)" in launcher.stderr.read()


def test_children_die_with_a_killed_launcher(child, tmp_path):
    launcher = _start_driver(child, tmp_path, "sleep")
    try:
        wait_files(tmp_path, [f"pid{r}" for r in range(3)])
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(3)]
        launcher.kill()  # SIGKILL: the launcher cannot clean up; PR_SET_PDEATHSIG does
        launcher.wait(5)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(alive(p) for p in pids)
    finally:
        for p in pids if "pids" in locals() else []:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


RANK_PROGRAM = """
import os, signal, sys, time
from llmpy.distributed.env import dist_env
from llmpy.distributed.rendezvous import exchange_id
from llmpy.distributed.watchdog import Watchdog
env = dist_env()
blob = exchange_id(env, bytes(range(16)) if env.rank == 0 else None, method=env.rdzv, path=env.rdzv_path,
                   timeout=env.timeout)
# one write, as in CHILD
os.write(1, f"id {blob.hex()} {env.world}\\n".encode())
# startup_timeout: until the first progress(); it must cover the slowest rank's start (file rendezvous: rank 0
# does not wait for the others) and, in training, the first step's compilation
wd = Watchdog(env, timeout=env.timeout, startup_timeout=60).start()
assert wd.ready.wait(30)
if sys.argv[1] == "ok":
    for _ in range(5):
        wd.progress()
        time.sleep(0.02)
    wd.stop()
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the watchdog can stop these ranks now
folder = sys.argv[2]
open(os.path.join(folder, f"set{env.rank}"), "w").close()
if env.rank == 1:
    while not all(os.path.exists(os.path.join(folder, f"set{r}")) for r in range(3)):
        time.sleep(0.01)
    os._exit(1)  # dies without a word
while True:
    wd.progress()
    time.sleep(0.02)
"""


def _free_port_pair() -> int:
    import socket
    for _ in range(20):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("", 0))
                b.bind(("", a.getsockname()[1] + 1))
                return a.getsockname()[1]
            except OSError:
                continue
    pytest.skip("no two consecutive free ports")


@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["tcp", "file"])
def test_end_to_end_rendezvous_and_watchdog(rdzv, tmp_path, capfd):
    prog = tmp_path / "rank.py"
    prog.write_text(RANK_PROGRAM)
    base = ["--nproc-per-node", "3", "--master-port", str(_free_port_pair()), "--timeout", "5", "--rdzv", rdzv]
    if rdzv == "file":
        base += ["--rdzv-path", str(tmp_path / "rdzv.json")]
    assert launch(parse(base + ["--", "ok"]), program=[sys.executable, str(prog)]) == 0
    out = capfd.readouterr().out
    assert sorted(line.split("] ")[-1] for line in out.splitlines() if "id " in line) == \
        [f"id {bytes(range(16)).hex()} 3"] * 3

    t = time.monotonic()
    code = launch(parse(base + ["--grace", "30", "--", "die", str(tmp_path)]), program=[sys.executable, str(prog)])
    assert code == 1 and time.monotonic() - t < 20  # the watchdog, not the launcher's 30 s grace, stopped them
    err = capfd.readouterr().err
    assert "llmpy launch: rank 1 exited with code 1" in err  # the cause, not the ranks the watchdog stopped
    assert "rank 0: rank 1's watchdog connection dropped (rank 1 died?); stopping" in err
    # rank 2 hears it from rank 0, or (when rank 1 died before rank 0 had accepted rank 2) sees rank 0 go
    assert re.search(r"\[rank 2\] rank 2: rank [01]'s watchdog connection dropped \(rank [01] died\?\); stopping",
                     err), err
