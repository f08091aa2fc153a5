"""A model folder's own tokenizer: `tokenizer.json` through Hugging Face's `tokenizers` library, else a SentencePiece
`tokenizer.model` through `sentencepiece` (the released MatMul-free models use Mistral-7B's 32k SentencePiece).
Both libraries are maintained and read the files as data (no code runs). The document and end tokens come from the
folder's config.json (bos/eos_token_id, when the tokenizer has them), else tokenizer_config.json (bos/eos_token), else `<s>` and `</s>`."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...paths import read_input

FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_file(path: str | Path) -> Path | None:
    """The tokenizer file `path` names (the file itself, or one of FILES in the folder, or beside the file)."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".json", ".model")) and p.name.startswith("tokenizer"):
        return p
    folder = p if p.is_dir() else p.parent
    for name in FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(read_input(path).decode("utf-8"))
    except (UserError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


class FileTokenizer:
    def __init__(self, file: Path):
        self.file, self.name = file, str(file)
        try:
            if file.suffix == ".json":
                from tokenizers import Tokenizer as HFTokenizer
                self._tok = HFTokenizer.from_file(str(file))
                self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
                self._id = self._tok.token_to_id
            else:
                import sentencepiece
                self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
                self.vocab_size = self._sp.get_piece_size()
                self._id = lambda piece: (self._sp.piece_to_id(piece)
                                          if self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece else None)
        except ImportError as e:
            lib = "tokenizers" if file.suffix == ".json" else "sentencepiece"
            raise UserError(f"reading {file} needs the {lib} package: pip install {lib} ({e})") from None
        except Exception as e:  # the libraries raise their own types for a malformed file
            raise UserError(f"{file} is not a tokenizer file this library reads: {str(e).splitlines()[0]}") from None
        self.doc, self.eot = self._special(file.parent)

    def _special(self, folder: Path) -> tuple[int, int]:
        cfg, tcfg = _json(folder / "config.json"), _json(folder / "tokenizer_config.json")
        out = []
        for kind, fallback in (("bos", "<s>"), ("eos", "</s>")):
            i = cfg.get(f"{kind}_token_id")
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                tok = tcfg.get(f"{kind}_token")
                tok = tok.get("content") if isinstance(tok, dict) else tok
                i = self._id(tok if isinstance(tok, str) else fallback)
            if i is None or not 0 <= i < self.vocab_size:
                raise UserError(f"{self.file}: cannot tell its {kind} token (no {kind}_token_id in config.json, no "
                                f"{kind}_token in tokenizer_config.json, no {fallback})")
            out.append(int(i))
        return out[0], out[1]

    def encode(self, text: str) -> list[int]:
        if hasattr(self, "_sp"):
            return list(self._sp.encode(text))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        if hasattr(self, "_sp"):
            return [list(x) for x in self._sp.encode(list(texts))]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.ravel().tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the tokenizer's vocabulary 0..{self.vocab_size - 1}")
        if hasattr(self, "_sp"):
            return self._sp.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> dict:
        return {self.file.name: hashlib.sha256(self.file.read_bytes()).hexdigest()}
