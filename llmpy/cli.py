"""`llmpy prepare | train | sample | eval | convert | tokenizer` (also `python -m llmpy ...`).

User errors (bad flags, bad files, divergence) print one line `error: ...` and exit with status 2; Ctrl-C exits
with 130 after training has written its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train GPT-2 (no arguments: a small model on Shakespeare, ~5 min on 2 cores)",
                       description="Train GPT-2. With no arguments: a small GPT-2 on the Shakespeare corpus "
                       "(fetched and tokenized on first use). Unset flags keep their defaults, or, with --resume, "
                       "the resumed run's settings.")
    a = p.add_argument
    a("--init", metavar="PATH|CONFIG", help="llm.c .bin, llmpy checkpoint, HF GPT-2 safetensors, or a config: "
      "d2..d48 (d12 = 124M), or lLhHcC[tT] such as l4h4c256t256 (default: l4h4c128t128)")
    a("--train-data", metavar="GLOB", help="llm.c-format token shards (default: the Shakespeare corpus)")
    a("--val-data", metavar="GLOB", help="validation shards (default: Shakespeare's val split when training on it)")
    a("--batch-size", "-b", type=int, metavar="B", help="sequences per micro-batch (default 16)")
    a("--seq-len", "-t", type=int, metavar="T", help="tokens per sequence (default 128)")
    a("--steps", type=int, help="optimizer steps (default 200)")
    a("--lr", type=float, help="peak learning rate (default 2e-3)")
    a("--lr-schedule", choices=["constant", "cosine", "linear", "wsd"], help="default cosine")
    a("--warmup-steps", type=int, help="linear warmup steps (default 20)")
    a("--final-lr-frac", type=float, help="lr at the end of cosine/linear/wsd as a fraction of --lr (default 0.1)")
    a("--decay-frac", type=float, help="wsd: fraction of the steps spent cooling down (default 0.2)")
    a("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    a("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    a("--eps", type=float, help="AdamW epsilon (default 1e-8)")
    a("--weight-decay", type=float, help="decoupled weight decay on 2-D weights (default 0.1)")
    a("--grad-clip", type=float, help="clip the global gradient norm to this; 0 = off (default 1.0)")
    a("--grad-accum", type=int, help="micro-batches per step (default 1)")
    a("--no-shuffle", dest="shuffle", action="store_const", const=False,
      help="llm.c's sequential order: batch i reads B*T+1 tokens from token i*B*T, shard after shard")
    a("--val-every", type=int, metavar="N", help="val loss before steps 0, N, 2N, ... and after the last; 0 = only "
      "after the last (default 50)")
    a("--val-batches", type=int, metavar="N", help="the first N batches of the val shards (default 10)")
    a("--sample-every", type=int, metavar="N", help="print a sample every N steps; 0 = off (default)")
    a("--sample-tokens", type=int, metavar="N", help="tokens per sample, also printed at the end; 0 = none (64)")
    a("--checkpoint-every", type=int, metavar="N", help="write the checkpoint every N steps (default 100) and at "
      "the end")
    a("--stop-at", type=int, metavar="STEP", help="stop after this step (checkpointed), keeping the schedule of "
      "--steps; continue later with --resume")
    a("--seed", type=int, help="seeds the init, the data order and sampling (default 1337)")
    a("--out", metavar="DIR", help="output folder (default runs/<date-time>)")
    a("--resume", metavar="DIR", help="continue the run in DIR bitwise identically")
    a("--device", choices=["cpu", "cuda", "auto"], help="default auto (cuda when a GPU is present)")
    a("--dtype", choices=["fp32", "bf16"], help="default fp32 on the CPU, bf16 on the GPU")
    a("--recompute", type=int, choices=[0, 1, 2], help="trade compute for activation memory: 1 recomputes GELU, "
      "2 also the LayerNorms, in backward (default 1 on the GPU, 0 on the CPU)")
    a("--no-master-weights", dest="master_weights", action="store_const", const=False,
      help="bf16: no fp32 master copy; AdamW writes the bf16 weights with stochastic rounding (less memory)")
    a("--no-graph", dest="graph", action="store_const", const=False, help="CUDA: run the step eagerly instead of "
      "replaying CUDA graphs")
    a("--zero", type=int, choices=[0, 1, 2], help="data parallel (under `llmpy launch`, mpirun or srun): 0 "
      "all-reduces gradients; 1 shards master weights and AdamW moments over the ranks; 2 also the gradients")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from .train import TrainConfig, run
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    tc = TrainConfig(**given, explicit=tuple(given))
    run(tc)
    return 0


def _cmd_prepare(args) -> int:
    from .data.prepare import prepare, prepare_shakespeare
    if not args.inputs:
        train, val = prepare_shakespeare(args.out)
        print(f"Shakespeare corpus ready:\n  --train-data '{train}'\n  --val-data '{val}'")
        return 0
    if not args.out:
        raise UserError("--out DIR is needed when preparing your own text files")
    train, val = prepare(args.inputs, args.out, args.name, val_tokens=args.val_tokens,
                         val_fraction=args.val_fraction, shard_tokens=args.shard_tokens)
    print(f"  --train-data '{os.path.join(args.out, args.name + '_train_*.bin')}'")
    if val:
        print(f"  --val-data '{os.path.join(args.out, args.name + '_val_*.bin')}'")
    return 0


def _load_any(path: str):
    from .formats.checkpoint import load_weights
    return load_weights(path)


def _cmd_sample(args) -> int:
    import numpy as np

    from .sample import generate
    from .data.tokenizers import get_tokenizer
    cfg, params = _load_any(args.checkpoint)
    tok = get_tokenizer()
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eot]
    n = args.max_new_tokens
    if n is None:
        n = min(256, cfg.max_seq_len - len(prompt))
    rng = np.random.default_rng(args.seed)
    if args.prompt:
        sys.stdout.write(args.prompt)
    pending = []

    def emit(t):  # stream, holding back bytes that do not yet form whole UTF-8 characters
        pending.append(t)
        text = tok.decode(pending)
        if "\ufffd" not in text:
            sys.stdout.write(text)
            sys.stdout.flush()
            pending.clear()

    generate(params, cfg, prompt, n, rng=rng, temperature=args.temperature, top_k=args.top_k or None,
             on_token=emit, stop_at_eot=args.stop_at_eot)
    if pending:
        sys.stdout.write(tok.decode(pending))
    sys.stdout.write("\n")
    return 0


def _cmd_eval(args) -> int:
    from .backends import get_backend, resolve_device
    from .data.loader import DataLoader
    from .models.gpt2 import GPT2
    cfg, params = _load_any(args.checkpoint)
    T = args.seq_len or cfg.max_seq_len
    loader = DataLoader(args.data, args.batch_size, T, vocab_size=cfg.vocab_size)
    n = min(args.batches or loader.num_batches_per_epoch, loader.num_batches_per_epoch)
    device = resolve_device(args.device)
    be = get_backend(device, args.dtype or ("bf16" if device == "cuda" else "fp32"))
    model = GPT2(cfg, be, args.batch_size, T, training=False)
    model.load_params(params)
    total = 0.0
    for _ in range(n):
        x, y = loader.next_batch()
        total += model.forward(x, y)
    print(f"val loss {total / n:.6f} over {n} batches of {args.batch_size}x{T} tokens")
    return 0


def _cmd_convert(args) -> int:
    from .formats.checkpoint import save_checkpoint
    from .formats.hf import write_hf_gpt2
    from .formats.llmc import write_llmc_model
    cfg, params = _load_any(args.input)
    to = args.to or ("llmc" if args.output.endswith(".bin") else "checkpoint"
                     if args.output.endswith(".safetensors") and not args.output.endswith("model.safetensors")
                     else "hf")
    if to in ("llmc", "llmc-bf16"):
        write_llmc_model(args.output, cfg, params, dtype="bf16" if to == "llmc-bf16" else "fp32")
    elif to == "hf":
        write_hf_gpt2(args.output, cfg, params)
    else:
        save_checkpoint(args.output, cfg, params)
    print(f"wrote {args.output} ({to})")
    return 0


def _cmd_tokenizer(args) -> int:
    from .data.tokenizers import get_tokenizer
    from .data.tokenizers.gpt2 import write_llmc_tokenizer
    tok = get_tokenizer()
    if args.llmc_out:
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
    ap = argparse.ArgumentParser(prog="llmpy", description="GPT-2 from scratch in Python (llm.c's formats).")
    ap.add_argument("--version", action="version", version=f"llmpy {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prepare", help="text files or folders -> llm.c token shards (none: the Shakespeare corpus)")
    p.add_argument("inputs", nargs="*", help="text files or folders (every *.txt below them)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--name", default="data", help="shard name prefix (default data)")
    p.add_argument("--val-tokens", type=int, help="the first N tokens go to the val split")
    p.add_argument("--val-fraction", type=float, default=0.05, help="else this fraction (default 0.05)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    p.set_defaults(func=_cmd_prepare)

    _train_parser(sub)
    from .distributed.launch import add_launch_parser
    add_launch_parser(sub)

    p = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="llmpy checkpoint, llm.c .bin or HF file")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", "-n", type=int, help="default 256 (or what fits the context)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k most likely; 0 = all (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eot", action="store_true", help="stop at <|endoftext|>")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="mean loss of a checkpoint on token shards")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("--data", required=True, metavar="GLOB", help="llm.c-format token shards")
    p.add_argument("--batch-size", "-b", type=int, default=8)
    p.add_argument("--seq-len", "-t", type=int, help="default: the model's context")
    p.add_argument("--batches", type=int, help="the first N batches (default: one pass over the shards)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("convert", help="convert weights between llm.c .bin, HF safetensors and llmpy checkpoints")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=["llmc", "llmc-bf16", "hf", "checkpoint"],
                   help="default from the output name: .bin -> llmc, model.safetensors or a folder -> hf, "
                   "other .safetensors -> checkpoint (weights only)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("tokenizer", help="GPT-2 BPE: write llm.c's tokenizer file, encode or decode")
    p.add_argument("--llmc-out", metavar="PATH", help="write llm.c's gpt2_tokenizer.bin here")
    p.add_argument("--encode", metavar="TEXT")
    p.add_argument("--decode", metavar="IDS")
    p.set_defaults(func=_cmd_tokenizer)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    multi = args.command == "train" and _ranks() > 1
    if multi or (args.command == "train" and os.environ.get("LLMPY_STACKS")):
        _stack_dumps_on_usr1()
    try:
        code = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except OSError as e:  # disk full, permission denied, ...: one line, the file and the reason
        where = f" {e.filename}" if e.filename else ""
        print(f"error:{where} {e.strerror or e}", file=sys.stderr)
        code = 2
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
