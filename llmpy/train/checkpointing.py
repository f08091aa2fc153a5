"""The training state on disk, in the run folder: `checkpoint.safetensors` (weights, AdamW moments, the bf16
compute copy, and step, loader position, sampler RNG, settings: formats/checkpoint.py) and, under ZeRO, one
optimizer shard per rank beside it. A checkpoint's "step" is the number of steps done: the state after step n
(numbered from 1), from which step n+1 starts, so that a resumed run is bitwise the uninterrupted one. With --keep N
the N-1 checkpoints before the latest stay as `checkpoint-<steps done>.safetensors` (hard links: no copy is made).
Nothing non-finite is ever written.

Resume (`open_resume`) reads and validates a checkpoint and decides what the flags given now mean for it: it
refuses, before touching anything, a resume that would do nothing, silently change the run's schedule, or mix
--init in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import check_file, file_problem, read_input
from .config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"
INT64_MAX = 2**63 - 1
KEPT = re.compile(r"checkpoint-(\d+)\.safetensors")
ONCE = ("stop_at", "progress", "extend", "overwrite")  # per-invocation settings, not part of the run


def kept_name(step: int) -> str:
    return f"checkpoint-{step:06d}.safetensors"


@dataclass
class Resume:
    ckpt: object        # formats.checkpoint.Checkpoint
    path: Path          # the checkpoint file
    src: Path           # its run folder (ZeRO shards and metrics.jsonl are read from there)
    step: int           # the steps done: the run continues with step step + 1
    planned: int        # the steps the run was planned for

    @property
    def state(self) -> dict:
        return self.ckpt.state


def open_resume(tc: TrainConfig) -> tuple[TrainConfig, Resume]:
    """(the settings to resume with, the checkpoint) for `--resume DIR` (its checkpoint.safetensors) or
    `--resume FILE`: the saved settings, overridden by the flags given now. Reads only."""
    from ..formats.checkpoint import load_checkpoint
    if tc.init is not None:
        raise UserError("--init and --resume exclude each other: a resumed run continues from its checkpoint's "
                        "weights (to start from a checkpoint's weights, use --init alone)")
    path = Path(tc.resume)
    if not os.path.lexists(path):
        raise UserError(f"--resume {tc.resume}: no such folder or file (give a run folder, or a checkpoint in one)")
    folder = os.path.isdir(path)
    path = path / CHECKPOINT if folder else path
    problem = file_problem(path)
    if problem is not None:
        raise UserError(f"--resume {tc.resume}: " + (f"the folder holds no {CHECKPOINT} (not a run folder, or its run "
                                                     "stopped before its first checkpoint)" if folder and
                                                     problem == "does not exist" else f"{path} {problem}"))
    ckpt = load_checkpoint(path)
    if "train" not in ckpt.state:
        raise UserError(f"{path} holds weights only (no training state): use --init {path} instead")
    step = _check_state(ckpt.state, path)
    src = path.parent
    new = _merge_resume(tc, ckpt.state["train"], src)
    res = Resume(ckpt, path, src, step, int(ckpt.state["train"]["steps"]))
    _refuse_pointless(new, res)
    bad = nonfinite(ckpt.params) + nonfinite(ckpt.adam_m or {}, "adam_m.") + nonfinite(ckpt.adam_v or {}, "adam_v.")
    if bad:
        raise UserError(f"{path} holds non-finite values ({', '.join(bad[:3])}): the file is damaged (llmpy never "
                        "writes them)")
    return new, res


def continues_in_place(out: Path, res: Resume) -> bool:
    """Whether a resumed run writes to the folder it came from (else `out` must be a new folder: the run is copied
    there and its own folder is left as it is). An earlier checkpoint is never continued in place: that would
    drop the run's later steps."""
    same = Path(out).resolve() == res.src.resolve()
    if same and res.path.name != CHECKPOINT:
        raise UserError(f"--resume {res.path}: not {res.src}'s latest {CHECKPOINT}; continue it into a new folder "
                        "with --out DIR")
    return same


def _check_state(st: dict, path: Path) -> int:
    """The step a checkpoint's state resumes at, after checking every field the resume uses, and that they agree
    with each other as the trainer writes them: a value that is not is damage, whatever else it would mean."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: the training state in its metadata is damaged: {what}")

    def count(d: dict, key: str, least: int, where: str = "") -> int:
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not least <= v <= INT64_MAX:
            raise bad(f"{where}{key} is {v!r}, want an integer in {least}..{INT64_MAX}")
        return v
    step = count(st, "step", 0)
    adam_t = count(st, "adam_t", 0)
    world = count(st, "world", 1)
    for key in ("loader", "sample_rng", "train"):
        if not isinstance(st.get(key), dict):
            raise bad(f"{key} is {st.get(key)!r}, want an object")
    try:
        np.random.default_rng(0).bit_generator.state = st["sample_rng"]
    except (TypeError, ValueError, KeyError) as e:
        raise bad(f"sample_rng is not a generator state ({e})") from None
    steps = count(st["train"], "steps", 0, "train.")
    if step > steps:
        raise bad(f"step {step} is past the run's {steps} planned steps (a checkpoint is written after a step of "
                  "its plan)")
    if adam_t != step:
        raise bad(f"adam_t {adam_t} differs from step {step} (the optimizer updates once a step)")
    ld = st["loader"]
    for key, least in (("epoch", 0), ("shard_pos", 0), ("sample_pos", 0), ("B", 1), ("T", 1), ("rank", 0),
                       ("seed", 0)):
        count(ld, key, least, "loader.")
    if count(ld, "world", 1, "loader.") != world:
        raise bad(f"loader.world {ld['world']} differs from world {world}")
    if not isinstance(ld.get("shuffle"), bool):
        raise bad(f"loader.shuffle is {ld.get('shuffle')!r}, want true or false")
    files = ld.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise bad(f"loader.files is {files!r}, want the list of the shards' names")
    return step


def _merge_resume(tc: TrainConfig, saved: dict, src: Path) -> TrainConfig:
    base = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    explicit = set(tc.explicit)
    for name in explicit:
        setattr(base, name, getattr(tc, name))
    base.resume, base.init = tc.resume, None
    for once in ONCE:
        if once not in explicit:
            setattr(base, once, getattr(TrainConfig, once))
    base.out = tc.out or str(src)
    base.check()
    return base


def _refuse_pointless(tc: TrainConfig, res: Resume) -> None:
    """A resume that would do nothing, or change the run's plan without saying so, is refused."""
    run, done, planned = res.src if res.path.name == CHECKPOINT else res.path, res.step, res.planned
    if tc.steps != planned:
        if tc.steps <= done:
            raise UserError(f"--steps {tc.steps}: {run} has done {done} steps already; nothing was changed")
        if tc.steps < planned:
            raise UserError(f"--steps {tc.steps} would shorten the {planned}-step {tc.lr_schedule} schedule of "
                            f"{run}; to stop early on it, use --stop-at {tc.steps}")
        if not tc.extend:
            raise UserError(f"{run} was planned for {planned} steps; --steps {tc.steps} stretches its "
                            f"{tc.lr_schedule} schedule, so the rest is not what an uninterrupted {tc.steps}-step "
                            "run would do: add --extend to do it anyway")
    elif done >= planned:
        raise UserError(f"{run} is finished ({done} of {planned} steps); to train it longer, give --steps N "
                        "--extend")
    elif tc.extend:
        raise UserError(f"--extend needs --steps larger than the run's {planned}")
    if tc.stop_at is not None and tc.stop_at <= done:
        raise UserError(f"--stop-at {tc.stop_at}: {run} has done {done} steps already; nothing was changed")


def gemm_pins(path: str) -> dict:
    """The matrix-product algorithm choices (cuda/gemm.py) kept in a checkpoint of a --tune-gemm run, or in a JSON
    file of the same form ({"cublaslt": version, "gpu": name, "algos": {shape: index}}). Reads headers only."""
    from ..formats.checkpoint import FORMAT
    from ..formats.safetensors import read_safetensors_header
    p = check_file(path, "--gemm-algos")
    try:
        if p.suffix == ".json":
            pins = json.loads(read_input(p, "--gemm-algos"))
        else:
            _, meta = read_safetensors_header(p)
            if meta.get("format") != FORMAT:
                raise UserError(f"--gemm-algos {path}: not an llmpy training checkpoint")
            pins = json.loads(meta.get("state", "{}")).get("gemm_algos")
            if pins is None:
                raise UserError(f"--gemm-algos {path}: this checkpoint holds no algorithm choices (its run had no "
                                "--tune-gemm)")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--gemm-algos {path}: unreadable ({e})") from None
    except RecursionError:
        raise UserError(f"--gemm-algos {path}: unreadable (JSON nested too deeply)") from None
    ok = (isinstance(pins, dict) and isinstance(pins.get("algos"), dict)
          and all(isinstance(v, int) and v >= 0 for v in pins["algos"].values()))
    if not ok:
        raise UserError(f"--gemm-algos {path}: expected {{\"cublaslt\": .., \"gpu\": .., \"algos\": {{shape: index}}}}")
    return pins


def nonfinite(arrays: dict, prefix: str = "") -> list[str]:
    """Names of the arrays holding NaN or Inf. A float64 sum of float32 values cannot overflow, and NaN/Inf
    propagate through it: one pass, no temporary of the array's size."""
    return [prefix + n for n, a in arrays.items() if not np.isfinite(np.sum(a, dtype=np.float64))]


def save(out: Path, done: int, tc: TrainConfig, model, opt, loader, sample_rng, dist, comm, *,
         prev_step: int | None = None, last_good: str = "") -> None:
    """Writes the state after `done` steps (from which step done+1 starts). Collective under data parallelism: a
    sharded master is gathered; each rank writes its optimizer shard (named by the steps done) before rank 0
    replaces the checkpoint, which then names them. prev_step: the step of the checkpoint now in `out` (kept as a copy when tc.keep > 1).
    Refuses (on every rank) to write weights or moments that are not finite; last_good says what is on disk."""
    from ..formats.checkpoint import save_checkpoint
    be = model.be
    state = {"step": done, "adam_t": opt.t, "loader": loader.state(), "world": dist.world,
             "sample_rng": sample_rng.bit_generator.state, "train": dataclasses.asdict(tc)}
    if getattr(be, "gemm", None) is not None and be.gemm.pinning:
        state["gemm_algos"] = be.gemm.export_pins()  # the products' algorithms: a resume replays them
    if getattr(model, "fp8_products", 0):  # --dtype fp8: the scales' amax histories (fp32 values, exact in JSON)
        state["fp8"] = {k: v.tolist() for k, v in be.fp8_state().items()}
    weights = model.params_numpy(comm)
    m = v = None
    if opt.sharded or dist.main:
        m, v = opt.moments_numpy()
    bad = []
    if dist.main:
        bad = nonfinite(weights)
    if m is not None:
        bad += nonfinite(m if isinstance(m, dict) else {"shard": m}, "adam_m.")
        bad += nonfinite(v if isinstance(v, dict) else {"shard": v}, "adam_v.")
    if dist.sum(float(bool(bad))) > 0:
        raise UserError(f"the weights or AdamW moments after step {done} are not finite "
                        f"({', '.join(bad[:3]) or 'on another rank'}): the checkpoint was not written; {last_good}. "
                        "Try a lower --lr, --grad-clip 1, or check --eps/--weight-decay")
    if opt.sharded:
        save_shard(out, done, dist, m, v)
        dist.barrier()
    if dist.main:
        if tc.keep > 1 and prev_step is not None and prev_step != done and (out / CHECKPOINT).exists():
            _link(out / CHECKPOINT, out / kept_name(prev_step))
        compute = None
        if np.dtype(be.param_dtype) != np.float32:
            compute = {n: np.asarray(be.to_numpy(model.params[n])).view(np.uint16) for n in model.params.shapes}
        save_checkpoint(out / CHECKPOINT, model.cfg, weights, adam_m=None if opt.sharded else m,
                        adam_v=None if opt.sharded else v, state=state, compute_bf16=compute)
        for p in kept(out)[:-(tc.keep - 1) or None]:
            p.unlink(missing_ok=True)
    if opt.sharded:
        dist.barrier()
        prune_shards(out, {done} | {int(KEPT.fullmatch(p.name)[1]) for p in kept(out)}, dist)


def kept(out: Path) -> list[Path]:
    """The kept earlier checkpoints, oldest first."""
    found = [(int(m[1]), p) for p in Path(out).iterdir() if (m := KEPT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _link(src: Path, dst: Path) -> None:
    """dst becomes another name of src's file (a copy where the filesystem has no hard links), atomically."""
    from ..formats.atomic import atomic_write
    if dst.exists() and os.path.samefile(src, dst):  # a kill between this link and the save that follows it
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid() % 10**8:08d}.tmp")  # a name the run folder's cleanup knows
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        tmp.unlink(missing_ok=True)  # rename(2) does nothing, leaving tmp, when both name one file already
    except OSError:
        tmp.unlink(missing_ok=True)
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 24))


def restore(res: Resume, model, opt, loader, sample_rng, dist) -> int:
    """Puts a resumed run's state back (its weights are loaded with the model); returns the step to start from."""
    be, st, ckpt = model.be, res.state, res.ckpt
    if opt.sharded:
        m, v = load_shard(res.src, res.step, dist)
        if nonfinite({"m": m, "v": v}):
            raise UserError(f"the ZeRO shard of rank {dist.rank} in {res.src} holds non-finite values: it is damaged")
        opt.load_moments(m, v)
    elif ckpt.adam_m is None:
        raise UserError(f"{res.path} has no optimizer state to resume from")
    else:
        opt.load_moments(ckpt.adam_m, ckpt.adam_v)
    if ckpt.compute_bf16 is not None:  # the compute copy was stochastically rounded: exact bits
        for name in model.params.shapes:
            be.copy_(model.params[name], be.asarray(ckpt.compute_bf16[name].view(be.param_dtype)))
    if getattr(model, "fp8_products", 0) and "fp8" in st:  # else (a run without --dtype fp8): scales calibrated anew
        try:
            be.fp8_load_state({k: np.asarray(v, np.float32) for k, v in st["fp8"].items()})
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{res.path}: its FP8 scale state is damaged ({e})") from None
    opt.t = st["adam_t"]
    loader.load_state(st["loader"])
    sample_rng.bit_generator.state = st["sample_rng"]
    return res.step


def shard_path(out: Path, step: int, rank: int, world: int) -> Path:
    return Path(out) / f"zero-step{step:08d}-rank{rank}-of-{world}.safetensors"


def save_shard(out, step: int, dist, m: np.ndarray, v: np.ndarray) -> None:
    from ..formats.safetensors import save_safetensors
    Path(out).mkdir(parents=True, exist_ok=True)
    save_safetensors(shard_path(out, step, dist.rank, dist.world), {"adam_m": m, "adam_v": v},
                     {"format": "llmpy-zero-shard", "step": str(step), "rank": str(dist.rank),
                      "world": str(dist.world)})


def load_shard(out, step: int, dist) -> tuple[np.ndarray, np.ndarray]:
    from ..formats.safetensors import load_safetensors
    path = shard_path(out, step, dist.rank, dist.world)
    if not path.exists():
        raise UserError(f"rank {dist.rank}: the optimizer shard {path.name} for step {step} is missing from {out} "
                        f"(ZeRO checkpoints need every rank's shard and the same number of ranks)")
    t, meta = load_safetensors(path)
    if meta.get("format") != "llmpy-zero-shard" or meta.get("step") != str(step):
        raise UserError(f"{path} is not the ZeRO shard of step {step}")
    return t["adam_m"], t["adam_v"]


def prune_shards(out, steps: set[int], dist) -> None:
    """Removes this rank's shards of steps other than `steps` (after the checkpoint naming the newest is in place)."""
    keep = {shard_path(out, s, dist.rank, dist.world).name for s in steps}
    pattern = re.compile(rf"zero-step\d+-rank{dist.rank}-of-{dist.world}\.safetensors")
    for p in Path(out).glob(f"zero-step*-rank{dist.rank}-of-{dist.world}.safetensors"):
        if p.name not in keep and pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)
