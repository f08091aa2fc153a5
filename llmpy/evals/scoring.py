"""Multiple-choice scoring through llmpy's own models, for any family on any backend: each choice is a row of tokens
(context + continuation), the model's per-token losses (`forward(tokens, targets)` fills stats["losses"], (B, T))
are summed over the continuation's tokens on the host, and the choice with the lowest sum wins (acc) or the lowest
normalized sum (acc_norm: per token for llm.c's HellaSwag, per character of the choice for the harness's tasks;
tasks.py says which task follows which).

Tokens (as the sources do). llm.c's rule: the context and " " + ending are encoded separately and joined. The
harness's rule (its `_encode_pair`): trailing spaces of the context move to the continuation, context +
continuation is encoded whole, and the continuation is what follows the context's own tokens. A tokenizer with a
beginning-of-text token distinct from its end-of-text (Llama 3, SentencePiece models) gets it in front of every row,
as Hugging Face tokenizers add it for the harness; GPT-2's rows start with the text itself (llm.c, the harness).

Batches. There is no ignored target index in the classifier (backends/cpu.py and the CUDA classifier.cu take every
target as a real token), so rows are right-padded with token 0 and the padding's losses are dropped on the host;
padding never changes the scored positions, which attend only to earlier ones. Rows of consecutive examples are
packed B to a forward (B*T ~ 2048 tokens, B at most the task's rows), rather than one example per forward: fewer
padded rows, and one model plan serves every task. T is the given one, or the longest row of the tasks scored so far
rounded up to a multiple of 64 (at most the model's context); the model is planned again only when a later task
needs a longer T or more rows per forward. A row longer than T + 1 tokens loses the start of its context (the
harness's left truncation), with a warning.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .tasks import Example, check_tasks, load_task
from .tasks import task as task_of

ROW_TOKENS = 2048  # tokens per forward (B*T): bounds the logits chunk, (B*T, V)
T_MULTIPLE = 64


class Scorer:
    """Scores tasks with the weights `params` of a model of config `cfg` on `backend`. tokenizer: a tokenizer
    object, or a name / file for data.tokenizers (None: by the model's vocabulary). T: the sequence length of every
    forward (None: from the rows, see the module docstring)."""

    def __init__(self, cfg, params, backend, tokenizer, T: int | None = None):
        if T is not None and not 1 <= T <= cfg.max_seq_len:
            raise UserError(f"the scoring sequence length must be in 1..{cfg.max_seq_len}, the model's context "
                            f"(got {T})")
        self.cfg, self.be, self.params, self.T = cfg, backend, params, T
        self.tok = _tokenizer(cfg, tokenizer)
        self.model = None
        self.progress = False  # a progress bar per task (evaluate() turns it on)

    def load_params(self, params) -> None:
        """New weights (a dict of host arrays as Model.params_numpy() returns; packed ternary ones for a packed
        MatMul-free model) for the next scores."""
        self.params = params
        if self.model is not None:
            self.model.load_params(params)

    def score(self, task: str, examples, limit: int | None = None) -> dict:
        """{"acc", "acc_norm", "n", "metric"} over the first `limit` examples (all when None) of `task`; metric
        names the headline one. No examples (a rank's empty share) score 0.0 with n = 0, so that n-weighted sums
        over ranks stay finite."""
        examples = list(examples)[:limit] if limit is not None else list(examples)
        sums, norms = self._score(task, examples)
        acc = sum(int(np.argmin(s)) == ex.label for s, ex in zip(sums, examples))
        acc_norm = sum(int(np.argmin(s / d)) == ex.label for s, d, ex in zip(sums, norms, examples))
        n = len(examples)
        return {"acc": acc / max(n, 1), "acc_norm": acc_norm / max(n, 1), "n": n,
                "metric": task_of(task).headline}

    def choice_losses(self, task: str, examples, limit: int | None = None) -> list[np.ndarray]:
        """Per example, the summed loss (nats, float64) of each choice's scored tokens."""
        examples = list(examples)[:limit] if limit is not None else list(examples)
        return self._score(task, examples)[0]

    # ---- internals ------------------------------------------------------------------------------------------
    def _score(self, task: str, examples: list[Example]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(summed losses, acc_norm divisors) per example, one entry per choice."""
        rule = task_of(check_tasks([task])[0]).rule
        rows, n_cont, norms = self._encode(rule, examples)
        sums = self._row_sums(task, rows, n_cont) if rows else np.zeros(0)
        out_s, out_n, i = [], [], 0
        for ex in examples:
            k = len(ex.endings)
            out_s.append(sums[i:i + k])
            out_n.append(np.asarray(norms[i:i + k], np.float64))
            i += k
        return out_s, out_n

    def _encode(self, rule: str, examples: list[Example]) -> tuple[list[list[int]], list[int], list[float]]:
        """Every choice's row of tokens, its number of scored (final) tokens, and its acc_norm divisor."""
        tok = self.tok
        pairs = [p for ex in examples for p in ex.pairs()]
        if rule == "llmc":
            ctx = tok.encode_batch([c for c, _ in pairs])
            cont = tok.encode_batch([x for _, x in pairs])
        else:
            moved = [_move_spaces(c, x) for c, x in pairs]
            ctx = tok.encode_batch([c for c, _ in moved])
            whole = tok.encode_batch([c + x for c, x in moved])
            # the continuation is what follows the context's own tokens; should a merge across the boundary eat
            # all of it, it is encoded on its own instead
            cont = [w[len(c):] or tok.encode(x) for c, w, (_, x) in zip(ctx, whole, moved)]
        bos = [tok.doc] if tok.doc != tok.eot else []
        rows, n_cont = [], []
        for c, x in zip(ctx, cont):
            head = bos + list(c) or [tok.eot]  # nothing before the continuation: the end-of-text token (harness)
            rows.append(head + list(x))
            n_cont.append(len(x))
        top = max((max(r) for r in rows), default=0)
        if top >= self.cfg.vocab_size:
            raise UserError(f"the tokenizer gives token id {top}, past the model's vocabulary of "
                            f"{self.cfg.vocab_size}: give the model's own tokenizer")
        if rule == "llmc":
            norms = [float(n) for n in n_cont]
        else:
            norms = [float(len(t)) for ex in examples for t in ex.choice_texts()]
        return rows, n_cont, norms

    def _model_for(self, need: int, rows: int):
        """The inference model, planned (again) only when `rows` rows of `need` tokens want a longer T or more rows
        per forward than the current plan has (B*T stays near ROW_TOKENS)."""
        T = self.T or min(self.cfg.max_seq_len, max(T_MULTIPLE, -(-need // T_MULTIPLE) * T_MULTIPLE))
        if self.model is not None and self.model.T >= T:
            T = self.model.T
        B = min(max(1, ROW_TOKENS // T), rows)
        if self.model is None or self.model.T != T or self.model.B < B:
            from ..models.base import inference_model
            self.model = None  # free the old plan before the new one is allocated
            self.model = inference_model(self.cfg, self.params, self.be, B, T)
        return self.model

    def _row_sums(self, task: str, rows: list[list[int]], n_cont: list[int]) -> np.ndarray:
        model = self._model_for(max(len(r) for r in rows) - 1, len(rows))
        B, T = model.B, model.T
        x, y = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        sums, cut = np.zeros(len(rows)), 0
        for b0 in tqdm(range(0, len(rows), B), desc=task, unit="batch", disable=None if self.progress else True,
                       file=sys.stderr, leave=False):
            x[:], y[:], spans = 0, 0, []
            for i, r in enumerate(rows[b0:b0 + B]):
                if len(r) > T + 1:
                    r, cut = r[-(T + 1):], cut + 1
                L, k = len(r), min(n_cont[b0 + i], len(r) - 1)
                x[i, :L - 1], y[i, :L - 1] = r[:-1], r[1:]
                spans.append((L - 1 - k, L - 1))  # the targets that are continuation tokens
            model.forward(x, y, return_loss=False)
            losses = self.be.to_numpy(model.stats["losses"])
            for i, (a, b) in enumerate(spans):
                sums[b0 + i] = losses[i, a:b].sum(dtype=np.float64)
        if cut:
            warnings.warn(f"{task}: {cut} of {len(rows)} rows are longer than {T + 1} tokens; the start of their "
                          "context was cut off", stacklevel=3)
        return sums


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _tokenizer(cfg, tokenizer):
    if tokenizer is None or isinstance(tokenizer, str):
        from ..data.tokenizers import get_tokenizer, tokenizer_for
        return get_tokenizer(tokenizer_for(cfg.vocab_size, tokenizer))
    return tokenizer


def evaluate(cfg, params, backend, tokenizer, tasks: list[str], limit=None, progress=True, *,
             T: int | None = None) -> dict[str, dict]:
    """Scores each task (its file downloaded into the cache once): {task: Scorer.score's dict}. Every file is
    fetched and parsed before any scoring, so a missing or malformed one fails early. T: as Scorer's."""
    names = check_tasks(tasks)
    data = {n: load_task(n, progress=progress) for n in names}
    scorer = Scorer(cfg, params, backend, tokenizer, T)
    scorer.progress = progress
    return {n: scorer.score(n, data[n], limit) for n in names}


def format_table(results: dict[str, dict]) -> str:
    """The results as a table: task, headline metric, acc, acc_norm, n."""
    lines = [f"{'task':<14} {'metric':<9} {'acc':>7} {'acc_norm':>8} {'n':>6}"]
    for name, r in results.items():
        lines.append(f"{name:<14} {r['metric']:<9} {r['acc']:>7.4f} {r['acc_norm']:>8.4f} {r['n']:>6}")
    return "\n".join(lines)
