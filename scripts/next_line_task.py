"""A multiple-choice task in HellaSwag's jsonl format made from Shakespeare's validation text, for training runs that
have no network (HellaSwag itself cannot be downloaded there): each example's context is a few consecutive lines of
verse, the right ending the line that follows, the wrong ones three lines drawn (seeded) from elsewhere in the val
text with a similar length. The val split is never trained on, so accuracy above 1/4 means the model learned the
plays' language, not the answers.

    python scripts/next_line_task.py OUT.jsonl [--n 500] [--seed 0]
    llmpy train ... --eval-tasks OUT.jsonl      (or llmpy eval --checkpoint RUN --tasks OUT.jsonl)
"""
from __future__ import annotations

import argparse
import glob
import json
import random

from llmpy.data.prepare import prepare_shakespeare
from llmpy.data.shards import read_shard
from llmpy.data.tokenizers import get_tokenizer
from llmpy.formats.atomic import atomic_write_bytes


def examples(text: str, n: int, seed: int, context_lines: int = 3) -> list[dict]:
    lines = [" ".join(ln.split()) for ln in text.splitlines()]
    verse = [i for i in range(context_lines, len(lines))
             if len(lines[i]) >= 25 and all(len(lines[j]) >= 10 for j in range(i - context_lines, i))]
    rng = random.Random(seed)
    by_len = sorted(verse, key=lambda i: len(lines[i]))
    out = []
    for i in rng.sample(verse, min(n, len(verse))):
        k = by_len.index(i)
        near = [j for j in by_len[max(0, k - 200):k + 200] if abs(j - i) > 50 and lines[j] != lines[i]]
        endings = [lines[j] for j in rng.sample(near, 3)]
        label = rng.randrange(4)
        endings.insert(label, lines[i])
        out.append({"ctx": " ".join(lines[i - context_lines:i]), "endings": endings, "label": label})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    _, val = prepare_shakespeare()
    text = "".join(get_tokenizer("gpt2").decode(read_shard(p).tolist()) for p in sorted(glob.glob(val)))
    rows = examples(text, a.n, a.seed)
    atomic_write_bytes(a.out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    print(f"{len(rows)} examples from Shakespeare's val split -> {a.out}")


if __name__ == "__main__":
    main()
