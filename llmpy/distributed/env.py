"""Who am I in a data-parallel job: `dist_env` reads our launcher's, Open MPI's, MPICH/PMI's or Slurm's variables.
Also the job-wide constants (ports, timeouts, variable names) and `force_nccl_settings`.

Ports: rank 0 serves the id rendezvous on MASTER_PORT (only while ranks join) and the watchdog on MASTER_PORT+1.
A watchdog abort exits with EXIT_CODE (75, EX_TEMPFAIL: the job can be restarted from its last checkpoint).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from ..errors import UserError

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
