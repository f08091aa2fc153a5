"""Where the command line enters: argparse whose errors are one line, integer options that fit in 64 bits, no empty
values (an empty path would be the current folder), negative numbers read as values (`--lr -inf` reaches its check),
Ctrl-C from the first line of `main` on (imports and set-up included), and warnings as one line."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: argument --lr: ...`, exit status 2) instead of the usage block and
    `llmpy train: error: ...`; subcommands' parsers are of this class too."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


INT64 = 2**63
TEXTS = {"prompt", "encode", "decode"}  # values that may be empty (an empty prompt is the start of a document)


def int64(s: str) -> int:
    """An integer flag: a plain integer that fits in 64 bits (what NumPy, the GPU and the seeds take)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if not -INT64 <= v < INT64:
        raise argparse.ArgumentTypeError(f"{s} is beyond a 64-bit integer's range")
    return v


def nonempty(convert):
    """`convert` (an option's type) refusing the empty string first."""
    def value(s: str):
        if s == "":
            raise argparse.ArgumentTypeError("an empty value (an empty path would mean the current folder, an empty "
                                             "name nothing); give one")
        return convert(s)
    value.__name__ = getattr(convert, "__name__", "value")
    return value


def check_values(parser: argparse.ArgumentParser) -> None:
    """Every integer option parses with int64; every other option and argument that takes a value refuses an empty
    one, but the texts (TEXTS)."""
    for act in parser._actions:
        if act.nargs in (0, argparse.REMAINDER, argparse.PARSER) or isinstance(act, argparse._SubParsersAction):
            continue
        if act.type is int:
            act.type = int64
        elif act.dest not in TEXTS:
            act.type = nonempty(act.type or str)


def subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for act in ap._actions if isinstance(act, argparse._SubParsersAction)
            for name, p in act.choices.items()}


def join_negative_numbers(ap: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--lr -inf` becomes `--lr=-inf`: argparse reads a word that starts with '-' and is no plain negative integer or
    decimal (-inf, -nan, -1e-3) as an option, and would answer "expected one argument"; joined, the value reaches
    its validation. Options of the command (the first word naming one) that take one value, up to a `--`."""
    subs = subparsers(ap)
    cmd = next((i for i, a in enumerate(argv) if a in subs), None)
    if cmd is None:
        return argv
    options = subs[argv[cmd]]._option_string_actions
    out, i = list(argv[:cmd + 1]), cmd + 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return out + argv[i:]
        act = options.get(a)
        if act is not None and act.nargs is None and i + 1 < len(argv) and argv[i + 1].startswith("-") \
                and _is_number(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class Interrupts:
    """Ctrl-C from main's first line on, imports and set-up included: remembers that it came, so that an import it cut
    short (some fail with an ImportError of their own then) still reads as the interrupt it was. Installed only over
    Python's default handler (a process started with SIGINT ignored keeps ignoring it)."""

    def __enter__(self):
        self.seen, self._old = False, None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (ours and the libraries') as one line `warning: ...`, without Python's file and source line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file, flush=True)
