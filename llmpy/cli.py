"""`llmpy prepare | train | sample | eval | convert | tokenizer` (also `python -m llmpy ...`).

Exit statuses: 0 done; 2 a user error (bad flags, bad files, divergence, out of memory: one line `error: ...`); a
training run stopped by a signal before its last step exits 128 + the signal once its checkpoint is written: 130
after Ctrl-C (SIGINT), 143 after SIGTERM (a run whose steps were all done exits 0); a second Ctrl-C aborts at once
with 130 (the previous checkpoint stays intact).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import cmdline
from .errors import UserError
from .paths import reason

SAMPLE_TOKENS = 256  # `llmpy sample`'s most new tokens by default (fewer when the model's context is shorter)


def _model_names() -> str:
    """What --init takes, from the family registry."""
    from .config import DEFAULT_FAMILY, FAMILIES, get_family
    fams = {f.name: f for f in (get_family(n) for n in sorted(FAMILIES))}.values()  # one entry per family
    return ("a model name family:config (" + "; ".join(f"{f.names}" for f in fams)
            + f"; a bare config is {get_family(DEFAULT_FAMILY).title})")


def _train_parser(sub) -> None:
    from .train.config import DEFAULT_MODEL, TrainConfig
    from .train.optim import SCHEDULES
    from .train.recipes import RECIPES
    D = TrainConfig()

    def dflt(name: str) -> str:  # the defaults live in TrainConfig alone
        return f"(default {getattr(D, name)})"

    p = sub.add_parser("train", help="train a model (no arguments: a small GPT-2 on Shakespeare, ~5 min on 2 cores)",
                       description="Train a model. With no arguments: a small GPT-2 on the Shakespeare corpus "
                       "(fetched and tokenized on first use). Unset flags keep their defaults, or, with --resume, "
                       "the resumed run's settings.")
    a = p.add_argument
    a("--init", metavar="PATH|MODEL", help="llm.c .bin, llmpy checkpoint, HF safetensors file or folder, or "
      f"{_model_names()} (default {DEFAULT_MODEL})")
    a("--train-data", metavar="GLOB", help="llm.c-format token shards (default: the Shakespeare corpus)")
    a("--val-data", metavar="GLOB", help="validation shards (default: Shakespeare's val split when training on it)")
    a("--batch-size", "-b", type=int, metavar="B", help=f"sequences per micro-batch {dflt('batch_size')}")
    a("--seq-len", "-t", type=int, metavar="T", help=f"tokens per sequence {dflt('seq_len')}")
    a("--steps", type=int, help=f"optimizer steps; with --resume, a different number needs --extend "
      f"{dflt('steps')}")
    a("--lr", type=float, help=f"peak learning rate {dflt('lr')}")
    a("--lr-schedule", choices=SCHEDULES, help=dflt("lr_schedule"))
    a("--warmup-steps", type=int, help=f"linear warmup steps {dflt('warmup_steps')}")
    a("--final-lr-frac", type=float, help=f"lr at the end of cosine/linear/wsd as a fraction of --lr "
      f"{dflt('final_lr_frac')}")
    a("--decay-frac", type=float, help=f"wsd: fraction of the steps spent cooling down {dflt('decay_frac')}")
    a("--beta1", type=float, help=f"AdamW beta1 {dflt('beta1')}")
    a("--beta2", type=float, help=f"AdamW beta2 {dflt('beta2')}")
    a("--eps", type=float, help=f"AdamW epsilon {dflt('eps')}")
    a("--weight-decay", type=float, help=f"decoupled weight decay on matrices and embeddings {dflt('weight_decay')}")
    a("--grad-clip", type=float, help=f"clip the global gradient norm to this; 0 = off {dflt('grad_clip')}")
    a("--grad-accum", type=int, help=f"micro-batches per step {dflt('grad_accum')}")
    a("--total-batch-size", type=int, metavar="TOKENS", help="tokens per optimizer step (llm.c's -d): sets "
      "--grad-accum to TOKENS / (B*T*ranks), which must divide it (default: from --grad-accum)")
    a("--no-shuffle", dest="shuffle", action="store_const", const=False,
      help="llm.c's sequential order: batch i reads B*T+1 tokens from token i*B*T, shard after shard")
    a("--val-every", type=int, metavar="N", help="val loss when 0, N, 2N, ... steps are done and after the last step, "
      f"logged at the steps done; 0 = only after the last {dflt('val_every')}")
    a("--val-batches", type=int, metavar="N", help=f"the first N batches of the val shards {dflt('val_batches')}")
    a("--sample-every", type=int, metavar="N", help=f"print a sample when N, 2N, ... steps are done; 0 = off "
      f"{dflt('sample_every')}")
    a("--sample-tokens", type=int, metavar="N", help=f"tokens per sample, also printed at the end; 0 = none "
      f"{dflt('sample_tokens')}")
    a("--eval-tasks", metavar="TASKS", type=lambda v: "" if v.strip().lower() == "none" else v,
      help="multiple-choice tasks scored during training, comma-separated (hellaswag, arc_easy, arc_challenge, "
      "piqa, winogrande, openbookqa, or a .jsonl file in HellaSwag's format; logged in metrics.jsonl and the "
      "plot); none = off (default: none)")
    a("--eval-every", type=int, metavar="N", help=f"score them when 0, N, 2N, ... steps are done and after the last "
      f"step; 0 = only after the last {dflt('eval_every')}")
    a("--eval-limit", type=int, metavar="N", help="score the first N examples of each task (default: all)")
    a("--recipe", choices=sorted(RECIPES), help="llm.c's published GPT-2 run of this size on FineWeb (prepare the "
      "data first: `llmpy prepare fineweb`); prints its settings; any flag given overrides (default: none)")
    a("--checkpoint-every", type=int, metavar="N", help="write the checkpoint when the steps done are a multiple of N, "
      f"and at the end {dflt('checkpoint_every')}")
    a("--keep", type=int, metavar="N", help="keep the last N checkpoints: checkpoint.safetensors (the latest, what "
      f"--resume DIR reads) and N-1 earlier ones as checkpoint-<steps done>.safetensors {dflt('keep')}")
    a("--stop-at", type=int, metavar="N", help="stop when N steps are done (checkpointed), keeping the schedule of "
      "--steps; continue later with --resume (default: run every step)")
    a("--seed", type=int, help=f"seeds the init, the data order and sampling {dflt('seed')}")
    a("--tokenizer", type=_tokenizer_arg, help="gpt2, llama3, or a tokenizer.json / tokenizer.model file or a "
      "folder holding one, for the Shakespeare shards and samples (default: by the model's vocabulary: Llama 3's "
      "128,256 tokens use llama3, else gpt2)")
    a("--out", metavar="DIR", help="output folder (default runs/<date-time>)")
    a("--overwrite", action="store_const", const=True, help="a new run in an --out that holds an earlier run's files "
      "(checkpoints, metrics.jsonl, loss.png, config.json): remove them first (without it the run stops)")
    a("--resume", metavar="DIR|FILE", help="continue the run in DIR (its checkpoint.safetensors, or the checkpoint "
      "FILE given) bitwise identically; with --out, into that new or empty folder, leaving DIR as it is "
      "(default: none)")
    a("--extend", action="store_const", const=True, help="with --resume: allow --steps beyond the run's planned "
      "steps, stretching its lr schedule (a warning shows the new schedule)")
    a("--device", choices=["cpu", "cuda", "auto"], help=f"{dflt('device')}: cuda when a GPU is present")
    a("--dtype", choices=["fp32", "bf16", "fp8"], help="default fp32 on the CPU, bf16 on the GPU; fp8: the "
      "blocks' matrix products on FP8 tensor cores (Hopper; the CPU emulates it), bf16 elsewhere")
    a("--recompute", type=int, choices=[0, 1, 2], help="trade compute for activation memory (GPT-2: 1 recomputes "
      "GELU, 2 also the LayerNorms, in backward; default 1 on the GPU, 0 on the CPU)")
    a("--recompute-keep", type=int, metavar="N", help="with --recompute 1 or 2: the first N layers keep what they "
      "would recompute (memory for speed, in between the levels; the same numbers; default 0)")
    a("--no-master-weights", dest="master_weights", action="store_const", const=False,
      help="bf16: no fp32 master copy; AdamW writes the bf16 weights with stochastic rounding (less memory)")
    a("--moments", choices=["fp32", "bf16"], help="AdamW's two moments: fp32, or bf16 with stochastic rounding "
      "(bf16 only: 4 bytes a parameter less, a faster update) {}".format(dflt("moments")))
    a("--fast-attention", action="store_const", const=True, help="CUDA: cuDNN's non-deterministic attention "
      "backward (faster; runs are then not bitwise reproducible, resumes not bitwise identical)")
    a("--tune-gemm", action="store_const", const=True, help="CUDA: time cuBLASLt's top 16 algorithms for each "
      "matrix-product shape on the first step and keep the fastest; the choices go into the checkpoint, so a "
      "resume is bitwise identical, but a fresh run may choose differently (several GPUs: all take rank 0's "
      "choices)")
    a("--gemm-algos", metavar="FILE", help="CUDA: replay the matrix-product algorithms a --tune-gemm run chose "
      "(its checkpoint, or a JSON of its choices): a fresh run bitwise identical to it on the same GPU and cuBLASLt "
      "(default: none)")
    a("--no-graph", dest="graph", action="store_const", const=False, help="CUDA: run the step eagerly instead of "
      "replaying CUDA graphs")
    a("--zero", type=int, choices=[0, 1, 2], help="data parallel (under `llmpy launch`, mpirun or srun): 0 "
      "all-reduces gradients; 1 shards master weights and AdamW moments over the ranks; 2 also the gradients "
      f"{dflt('zero')}")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar: one line per "
      "step (as without a terminal)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train import TrainConfig, run
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    settings = dict(given)
    if args.recipe:
        from .train.recipes import describe, recipe_settings
        if args.resume:
            raise UserError("--recipe starts a run; --resume continues one with its own settings (drop --recipe)")
        from .distributed.env import dist_env
        recipe, prepare = recipe_settings(args.recipe)
        if dist_env().rank == 0:  # once per job, not once per rank
            print(describe(args.recipe, recipe, given))
        settings = dict(recipe, **given)
        import glob
        if not glob.glob(settings["train_data"]):
            raise UserError(f"--recipe {args.recipe}: no token shards match {settings['train_data']}; prepare them "
                            f"first (`{prepare}`) or give --train-data")
    tc = TrainConfig(**settings, explicit=tuple(given))  # the recipe's settings are not the command line's
    res = run(tc)
    return 128 + res.signal if res.signal else 0


def _cmd_prepare(args) -> int:
    from .data.fineweb import DATASETS, prepare_fineweb
    from .data.prepare import SHARD_TOKENS, VAL_FRACTION, prepare, prepare_shakespeare
    fineweb = len(args.inputs) == 1 and args.inputs[0] in DATASETS and not os.path.lexists(args.inputs[0])
    only_fineweb = [f for f, v in (("--sample", args.sample), ("--tokens", args.tokens), ("--workers", args.workers))
                    if v is not None]
    shard_tokens = SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
    if fineweb:
        if args.val_tokens is not None or args.val_fraction is not None:
            raise UserError("--val-tokens and --val-fraction are for text files: FineWeb's val split is its first "
                            "shard (--shard-tokens)")
        train, val = prepare_fineweb(args.inputs[0], args.sample or "10BT", args.out, tokens=args.tokens,
                                     tokenizer=args.tokenizer, workers=args.workers,
                                     shard_tokens=shard_tokens, name=args.name, overwrite=args.overwrite)
        print(f"  --train-data '{train}'\n  --val-data '{val}'")
        return 0
    if only_fineweb:
        raise UserError(f"{', '.join(only_fineweb)}: only for `llmpy prepare fineweb-edu` or `fineweb`")
    if not args.inputs:
        mine = [f for f, v in (("--name", args.name), ("--val-tokens", args.val_tokens),
                               ("--val-fraction", args.val_fraction), ("--shard-tokens", args.shard_tokens))
                if v is not None]
        if mine:
            raise UserError(f"{', '.join(mine)}: only for your own text files (the Shakespeare corpus is prepared one "
                            "way: its name, split and one shard each are fixed)")
        train, val = prepare_shakespeare(args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"Shakespeare corpus ready:\n  --train-data '{train}'\n  --val-data '{val}'")
        return 0
    if args.out is None:
        raise UserError("--out DIR is needed when preparing your own text files")
    if args.val_tokens is not None and args.val_fraction is not None:
        raise UserError("--val-tokens and --val-fraction both size the val split: give one of them")
    name = "data" if args.name is None else args.name
    train, val = prepare(args.inputs, args.out, name, val_tokens=args.val_tokens,
                         val_fraction=VAL_FRACTION if args.val_fraction is None else args.val_fraction,
                         shard_tokens=shard_tokens, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"  --train-data '{os.path.join(args.out, name + '_train_*.bin')}'")
    if val:
        print(f"  --val-data '{os.path.join(args.out, name + '_val_*.bin')}'")
    return 0


def _weights_path(path: str) -> str:
    """A run folder means its latest checkpoint; anything else is passed on (an HF folder, a file, a Hub name)."""
    from .train.checkpointing import CHECKPOINT
    ck = os.path.join(path, CHECKPOINT)
    return ck if os.path.isdir(path) and os.path.isfile(ck) else path


def _load_any(path: str, *, finite: bool = True, packed_ok: bool = False):
    """(config, weights) from any weights file or a run folder; finite: NaN/Inf weights are an error; packed_ok:
    a packed ternary model is welcome (inference)."""
    from .formats.checkpoint import load_weights
    from .train.checkpointing import nonfinite
    cfg, params = load_weights(_weights_path(path), packed_ok=packed_ok)
    bad = nonfinite({k: v for k, v in params.items() if not hasattr(v, "codes")}) if finite else []
    if bad:
        raise UserError(f"{path}: the weights hold NaN/Inf ({', '.join(bad[:3])}); nothing to compute with them")
    return cfg, params


def _run_settings(path: str) -> dict | None:
    """The training settings saved in an llmpy training checkpoint (None for other weight files); settings that
    are not what the trainer writes (checked as a resume checks them) are a one-line error."""
    import json

    from .formats.checkpoint import FORMAT
    from .formats.safetensors import read_safetensors_header
    from .train.config import TrainConfig
    try:
        _, meta = read_safetensors_header(_weights_path(path))
        train = json.loads(meta.get("state", "{}")).get("train") if meta.get("format") == FORMAT else None
    except (UserError, ValueError, AttributeError, OSError, RecursionError):
        return None
    if not isinstance(train, dict):
        return None
    try:
        TrainConfig(**{k: v for k, v in train.items() if k in TrainConfig.__dataclass_fields__}).check(files=False)
    except (UserError, TypeError) as e:
        raise UserError(f"{_weights_path(path)}: the training settings in its metadata are damaged ({e})") from None
    return train


def _backend(args):
    from .backends import get_backend, resolve_device
    device = resolve_device(args.device)
    return get_backend(device, args.dtype or ("bf16" if device == "cuda" else "fp32"))


def _tokenizer_arg(s: str) -> str:
    """--tokenizer: a known name, a tokenizer file or a folder holding one (the file is read when the tokenizer is
    needed); the same rule as a run's settings (data/tokenizers: tokenizer_problem)."""
    from .data.tokenizers import tokenizer_problem
    problem = tokenizer_problem(s)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return s


def _cmd_sample(args) -> int:
    import numpy as np

    from .data.tokenizers import get_tokenizer, tokenizer_for
    from .models.decode import check_sampling, decoder, generate, generate_batch
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0 (got {args.seed})")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise UserError(f"-n must be >= 0 (got {args.max_new_tokens})")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1 (got {args.num_samples})")
    check_sampling(args.temperature, args.top_k, args.top_p)
    cfg, params = _load_any(args.checkpoint, packed_ok=True)
    from .data.tokenizers.files import tokenizer_file
    own = tokenizer_file(_weights_path(args.checkpoint)) if os.path.exists(args.checkpoint) else None
    tok = get_tokenizer(tokenizer_for(cfg.vocab_size, args.tokenizer or (str(own) if own else None)))
    prompt = tok.encode(args.prompt) if args.prompt else [tok.doc if tok.doc < cfg.vocab_size else 0]
    if not args.prompt and tok.doc >= cfg.vocab_size:
        print(f"note: starting from token 0 (the model's vocabulary of {cfg.vocab_size} has no document token "
              f"{tok.doc})", file=sys.stderr)
    n = args.max_new_tokens
    if n is None:  # what fits the context after the prompt (the CPU-sized models have 128 tokens), at most 256
        room = cfg.max_seq_len - len(prompt)
        n = min(SAMPLE_TOKENS, room if room > 0 else cfg.max_seq_len)
    be = _backend(args)
    model = decoder(cfg, params, be)
    N = args.num_samples
    if N > 1:  # N sequences decoded as one batch, sharing the weights of the one-sequence decoder
        _check_batch_memory(model, N, min(len(prompt[-cfg.max_seq_len:]) + n, cfg.max_seq_len))
        model = decoder(cfg, params, be, N, weights_of=model)
    pending, ctx = [], []

    def flush(final=False):
        # the new tokens' text is decoded after a few tokens already shown (SentencePiece renders a word's leading
        # space only after other text); bytes that do not yet form whole UTF-8 characters are held back
        head = tok.decode(ctx) if ctx else ""
        text = tok.decode(ctx + pending)
        text = text[len(head):] if text.startswith(head) else tok.decode(pending)
        if final or "\ufffd" not in text:
            sys.stdout.write(text)
            sys.stdout.flush()
            ctx[:] = (ctx + pending)[-4:]
            pending.clear()

    def emit(t):
        pending.append(t)
        flush()

    def start(i):
        if N > 1:
            sys.stdout.write(f"--- sample {i + 1} of {N} ---\n")
        ctx[:] = prompt[-4:] if args.prompt else []
        if args.prompt:
            sys.stdout.write(args.prompt)

    def end():
        if pending:
            flush(final=True)
        sys.stdout.write("\n")

    # sample i draws with the generator of seed + i: the draws of `--seed S+i --num-samples 1`
    rngs = [np.random.default_rng(args.seed + i) for i in range(N)]
    kw = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
              stop_at=tok.eot if args.stop_at_eot else None)
    if N == 1:  # streamed as drawn
        start(0)
        generate(model, prompt, n, rng=rngs[0], on_token=emit, **kw)
        end()
        return 0
    for i, new in enumerate(generate_batch(model, prompt, n, rngs=rngs, **kw)):
        start(i)
        for t in new:
            emit(t)
        end()
    return 0


def _check_batch_memory(one, n: int, length: int) -> None:
    """UserError when n sequences of up to `length` tokens (their decoding states and their rows of a step's
    activations, beside the weights `one`, the decoder of one sequence, holds) would not fit the free memory of its
    device, saying how many would."""
    from .models.decode import row_bytes
    state, acts, kind = row_bytes(one, length)
    per, free = state + acts, _free_bytes(one.be)
    if free is None or n * per <= free:
        return
    where = "GPU" if hasattr(one.be, "cp") else "host"

    def size(b):
        return f"{b / 2**30:,.1f} GiB" if b >= 2**30 else f"{b / 2**20:,.2f} MiB"
    raise UserError(f"--num-samples {n} needs {size(n * per)} beside the weights ({size(per)} a sample: its {kind} "
                    f"for {length} tokens and its row of a step's activations), more than the {size(free)} free on "
                    f"the {where}: at most {free // per:,} samples at once here")


def _free_bytes(be) -> int | None:
    """Bytes the backend's device can still allocate (the GPU's free memory and its memory pool's cached blocks; the
    host's available memory), or None when not known."""
    cp = getattr(be, "cp", None)
    if cp is not None:
        return int(cp.cuda.runtime.memGetInfo()[0]) + int(cp.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as f:
            kib = [int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")]
        return kib[0] * 1024 if kib else None
    except (OSError, ValueError):
        return None


def _cmd_eval(args) -> int:
    """Evaluates the way training validates: the mean loss of the first N batches of BxT tokens, in order; the
    defaults are the run's own (its val data, batch size, seq len, --val-batches) for a training checkpoint, else
    `llmpy train`'s. With --tasks: scores zero-shot multiple-choice tasks instead (llmpy/evals) and prints a table."""
    if args.tasks is not None:
        from .data.tokenizers.files import tokenizer_file
        from .evals import check_tasks, evaluate, format_table
        tasks = check_tasks(args.tasks)
        for flag, v in (("--data", args.data), ("--batch-size", args.batch_size), ("--batches", args.batches)):
            if v is not None:
                raise UserError(f"{flag} sets the loss evaluation on token shards; it does not go with --tasks")
        if args.limit is not None and args.limit < 1:
            raise UserError(f"--limit must be >= 1 (got {args.limit})")
        cfg, params = _load_any(args.checkpoint, packed_ok=True)
        own = tokenizer_file(_weights_path(args.checkpoint)) if os.path.exists(args.checkpoint) else None
        results = evaluate(cfg, params, _backend(args), args.tokenizer or (str(own) if own else None), tasks,
                           limit=args.limit, T=args.seq_len)
        print(format_table(results))
        return 0
    if args.limit is not None or args.tokenizer is not None:
        raise UserError(f"{'--limit' if args.limit is not None else '--tokenizer'} goes with --tasks")
    from .data.loader import DataLoader
    from .models.base import inference_model
    from .train.config import TrainConfig
    for flag, v in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--batches", args.batches)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1 (got {v})")
    cfg, params = _load_any(args.checkpoint, packed_ok=True)
    D, run = TrainConfig(), _run_settings(args.checkpoint) or {}
    data = args.data or run.get("val_data")
    if data is None and run and run.get("train_data") is None:  # the run trained on the Shakespeare corpus
        from .data.prepare import prepare_shakespeare
        data = prepare_shakespeare()[1]
    if data is None:
        raise UserError("--data GLOB is needed: which token shards to evaluate on")
    B = args.batch_size or run.get("batch_size") or D.batch_size
    T = args.seq_len or run.get("seq_len") or min(D.seq_len, cfg.max_seq_len)
    loader = DataLoader(data, B, T, vocab_size=cfg.vocab_size)
    n = min(args.batches or run.get("val_batches") or D.val_batches, loader.num_batches_per_epoch)
    model = inference_model(cfg, params, _backend(args), B, T)
    total = 0.0
    for _ in range(n):
        x, y = loader.next_batch()
        total += model.forward(x, y)
    print(f"val loss {total / n:.6f} over {n} batches of {B}x{T} tokens")
    return 0


def _cmd_convert(args) -> int:
    from .formats.checkpoint import save_checkpoint
    from .formats.hf import write_hf_model
    from .formats.llmc import write_llmc_model
    from .formats.outputs import check_output, drop_hf_shards, output_format
    to = output_format(args.output, args.to)
    check_output(args.output, to, args.overwrite)
    cfg, params = _load_any(args.input, finite=False)  # a file converts as it is
    if to in ("ternary", "ternary-2bit"):
        from .formats.ternary import write_ternary
        size = write_ternary(args.output, cfg, params, packing="2bit" if to == "ternary-2bit" else "base3")
        print(f"wrote {args.output} (ternary: {size['bytes'] / 2**20:,.1f} MiB, the fp32 weights "
              f"{size['fp32_bytes'] / 2**20:,.1f} MiB: {size['fp32_bytes'] / size['bytes']:.1f}x smaller)")
        return 0
    if to in ("llmc", "llmc-bf16"):
        write_llmc_model(args.output, cfg, params, dtype="bf16" if to == "llmc-bf16" else "fp32")
    elif to == "hf":
        drop_hf_shards(args.output)  # only there with --overwrite
        from pathlib import Path
        src = Path(args.input) if os.path.isdir(args.input) else Path(args.input).parent
        hf_src = src if (src / "config.json").is_file() else None  # a Hugging Face model folder: its tokenizer
        write_hf_model(args.output, cfg, params, tokenizer_from=hf_src)
    else:
        save_checkpoint(args.output, cfg, params)
    print(f"wrote {args.output} ({to})")
    return 0


def _cmd_tokenizer(args) -> int:
    from .data.tokenizers import get_tokenizer
    from .data.tokenizers.gpt2 import write_llmc_tokenizer
    if args.llmc_out is None and args.encode is None and args.decode is None:
        args.parser.print_help()
        return 0
    tok = get_tokenizer(args.tokenizer)
    if args.llmc_out:
        if args.tokenizer != "gpt2":
            raise UserError("--llmc-out writes llm.c's GPT-2 tokenizer file: use --tokenizer gpt2")
        if os.path.exists(args.llmc_out) and not args.overwrite:
            raise UserError(f"{args.llmc_out} exists: choose another --llmc-out, or add --overwrite to replace it")
        write_llmc_tokenizer(args.llmc_out, tok)
        print(f"wrote {args.llmc_out} (llm.c tokenizer, {tok.vocab_size} tokens)")
    if args.encode is not None:
        print(" ".join(map(str, tok.encode(args.encode))))
    if args.decode is not None:
        try:
            ids = [int(t) for t in args.decode.replace(",", " ").split()]
        except ValueError:
            raise UserError("--decode takes token ids separated by spaces or commas") from None
        print(tok.decode(ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = cmdline.Parser(prog="llmpy", description="Language models trained from scratch in Python: GPT-2, Llama 3 "
                        "and the MatMul-free LM, hand-written forward and backward passes in NumPy on the CPU and "
                        "CUDA kernels on NVIDIA GPUs; llm.c's and Hugging Face's files.")
    ap.add_argument("--version", action="version", version=f"llmpy {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    from .data.prepare import SHARD_TOKENS, VAL_FRACTION
    p = sub.add_parser("prepare", help="text files or folders -> llm.c token shards (none: the Shakespeare corpus; "
                       "fineweb-edu or fineweb: a FineWeb sample from the Hugging Face Hub)")
    p.add_argument("inputs", nargs="*", help="text files or folders (every *.txt below them); or the one word "
                   "fineweb-edu or fineweb (where no such file or folder exists): download the dataset's --sample "
                   "into the cache and tokenize it, llm.c's way (the first shard is val, the others train)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the cache, for the Shakespeare corpus and "
                   "FineWeb, e.g. edu_fineweb10B/; needed for your own files)")
    p.add_argument("--name", help="shard name prefix (default: data; FineWeb: edu_fineweb or fineweb, as llm.c)")
    p.add_argument("--val-tokens", type=int, help="the first N tokens go to the val split (default: "
                   "--val-fraction)")
    p.add_argument("--val-fraction", type=float, help=f"else this fraction (default {VAL_FRACTION})")
    p.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {SHARD_TOKENS})")
    p.add_argument("--sample", choices=("10BT", "100BT"), help="FineWeb: which sample (default 10BT)")
    p.add_argument("--tokens", type=int, metavar="N", help="FineWeb: stop after N tokens (default: the whole "
                   "sample); only the files needed are downloaded")
    p.add_argument("--workers", type=int, metavar="N", help="FineWeb: tokenizing processes (default: one per CPU)")
    p.add_argument("--tokenizer", type=_tokenizer_arg, default="gpt2", help="gpt2: uint16 shards; llama3: "
                   "Meta's (Llama 3 Community License), uint32 shards; or a tokenizer.json / tokenizer.model file or "
                   "a model folder holding one (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of the same --name already in --out "
                   "(without it such shards are left alone and the command stops)")
    p.set_defaults(func=_cmd_prepare)

    _train_parser(sub)
    from .distributed.launch import add_launch_parser
    add_launch_parser(sub)

    p = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run folder, llmpy checkpoint, llm.c .bin "
                   "or HF file or folder (required)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="tokens to generate; past the model's context the "
                   f"window slides (default: what fits the model's context after the prompt, at most {SAMPLE_TOKENS})")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, decoded together as one batch; "
                   "sample i draws what --seed SEED+i alone would (to the rounding of the batched products), and "
                   "every sample holds its own KV cache or recurrent state: the command says how many fit "
                   "(default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely; 0 = all (default "
                   "%(default)s)")
    p.add_argument("--top-p", type=float, help="then from the most likely tokens whose probability reaches P, in "
                   "(0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--stop-at-eot", action="store_true", help="stop at the tokenizer's end of text (default: off)")
    p.add_argument("--tokenizer", type=_tokenizer_arg, help="gpt2, llama3, or a tokenizer.json / tokenizer.model "
                   "file or folder (default: the checkpoint folder's own tokenizer file when it has one, else by the "
                   "model's vocabulary: Llama 3's 128,256 tokens: llama3, else gpt2)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="(default %(default)s: cuda "
                   "when a GPU is present)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default fp32 on the CPU, bf16 on the GPU")
    p.set_defaults(func=_cmd_sample)

    from .train.config import TrainConfig
    D = TrainConfig()
    from .evals.tasks import TASKS
    p = sub.add_parser("eval", help="mean loss of a checkpoint on token shards, the way training validates; or "
                       "zero-shot multiple-choice tasks (--tasks)",
                       description="The mean loss over the first N batches of BxT tokens of the shards, in order: "
                       "what `llmpy train` logs as val_loss. For a training checkpoint (or run folder) every "
                       "default is the run's own, so that eval repeats its last validation. With --tasks: the "
                       "accuracy on zero-shot multiple-choice tasks (acc and acc_norm; HellaSwag as llm.c scores it, "
                       "the others as the EleutherAI lm-evaluation-harness does), their files downloaded once into "
                       "the cache.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run folder, llmpy checkpoint, llm.c .bin "
                   "or HF file or folder (required)")
    p.add_argument("--tasks", metavar="TASKS", help=f"score these tasks, comma-separated: {', '.join(TASKS)}, or "
                   "a .jsonl file of your own in HellaSwag's format (ctx, endings, label a line) (default: none: the "
                   "loss on token shards)")
    p.add_argument("--limit", type=int, metavar="N", help="with --tasks: the first N examples of each task "
                   "(default: all)")
    p.add_argument("--tokenizer", type=_tokenizer_arg, help="with --tasks: gpt2, llama3, or a tokenizer.json / "
                   "tokenizer.model file or folder (default: the checkpoint folder's own tokenizer file when it has "
                   "one, else by the model's vocabulary: Llama 3's 128,256 tokens: llama3, else gpt2)")
    p.add_argument("--data", metavar="GLOB", help="llm.c-format token shards (default: the run's val data)")
    p.add_argument("--batch-size", "-b", type=int, help=f"(default: the run's, else {D.batch_size})")
    p.add_argument("--seq-len", "-t", type=int, help=f"(default: the run's, else {D.seq_len} or the model's "
                   "context if shorter; with --tasks: the longest example rounded up to a multiple of 64, at most "
                   "the model's context, longer ones losing the start of their context)")
    p.add_argument("--batches", type=int, help=f"the first N batches (default: the run's --val-batches, else "
                   f"{D.val_batches}; at most one pass)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=D.device, help="(default %(default)s: "
                   "cuda when a GPU is present)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default fp32 on the CPU, bf16 on the GPU")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("convert", help="convert weights between llm.c .bin, HF safetensors and llmpy checkpoints")
    p.add_argument("input", help="a run folder (its latest checkpoint), llmpy checkpoint, llm.c .bin, HF file or "
                   "folder")
    p.add_argument("output", help="the file or folder to write")
    p.add_argument("--to", choices=["llmc", "llmc-bf16", "hf", "checkpoint", "ternary", "ternary-2bit"],
                   help="default from the output name: .bin -> llmc, model.safetensors or a folder (a name without "
                   "an extension, or ending in /) -> hf, other .safetensors -> checkpoint (weights only: no AdamW "
                   "state); any other name needs --to; ternary: a MatMul-free model packed for inference (5 codes "
                   "per byte; ternary-2bit: 4 per byte)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file, or the files in the output "
                   "folder, when they exist (without it an existing output is left alone and the command stops)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("tokenizer", help="a tokenizer (GPT-2's or Llama 3's BPE): encode, decode, or write llm.c's "
                       "GPT-2 tokenizer file")
    p.add_argument("--tokenizer", type=_tokenizer_arg, default="gpt2", help="(default %(default)s; llama3: "
                   "Meta's, under the Llama 3 Community License)")
    p.add_argument("--llmc-out", metavar="PATH", help="write llm.c's gpt2_tokenizer.bin here (default: not written)")
    p.add_argument("--overwrite", action="store_true", help="with --llmc-out: replace the file when it exists")
    p.add_argument("--encode", metavar="TEXT", help="print TEXT's token ids (default: none)")
    p.add_argument("--decode", metavar="IDS", help="print the text of token ids separated by spaces or commas "
                   "(default: none)")
    p.set_defaults(func=_cmd_tokenizer, parser=p)
    for parser in (ap, *cmdline.subparsers(ap).values()):
        cmdline.check_values(parser)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    multi, command = False, argv[0] if argv else ""
    with cmdline.Interrupts() as sigint, warnings.catch_warnings():
        warnings.showwarning = cmdline.one_line_warning
        try:
            ap = build_parser()
            args = ap.parse_args(cmdline.join_negative_numbers(ap, argv))
            if args.command is None:
                ap.print_help()
                return 0
            command = args.command
            multi = args.command == "train" and _ranks() > 1
            if multi or (args.command == "train" and os.environ.get("LLMPY_STACKS")):
                _stack_dumps_on_usr1()
            code = args.func(args)
        except UserError as e:
            print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = 130
        except OSError as e:  # disk full, permission denied, ... where no reader or writer named it: one sentence
            where = f" on {e.filename}" if e.filename else ""
            print(f"error: llmpy {command} stopped{where}: {reason(e)}", file=sys.stderr)
            code = 2
        except MemoryError as e:  # CuPy's out-of-memory error is one too
            print(f"error: out of memory ({e or 'the allocation failed'}): use a smaller model, batch or --seq-len",
                  file=sys.stderr)
            code = 2
        except BaseException:
            if not sigint.seen:  # a bug: its traceback is what a report needs
                raise
            print("interrupted", file=sys.stderr)  # an import cut short by Ctrl-C failed its own way
            code = 130
    if multi:
        # A rank of a data-parallel run leaves without running destructors, on success and on error alike:
        # tearing down NCCL, CUDA graphs and cuDNN handles at interpreter exit was seen to hang a rank forever
        # (H200 x2, 2026-11-28). Everything it writes is written atomically before this point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _ranks() -> int:
    from .distributed.env import dist_env
    try:
        return dist_env().world
    except UserError:
        return 1  # a malformed environment is reported by the training run itself


def _stack_dumps_on_usr1() -> None:
    """`kill -USR1 <pid>` makes a rank write every thread's Python stack, for finding where a job hangs: to
    $LLMPY_STACKS/stacks-<pid>.txt when that folder is set (output pipes may be gone by then), else stderr."""
    import faulthandler
    import signal
    folder = os.environ.get("LLMPY_STACKS")
    out = sys.stderr
    if folder:
        os.makedirs(folder, exist_ok=True)
        out = open(os.path.join(folder, f"stacks-{os.getpid()}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=out, all_threads=True)
