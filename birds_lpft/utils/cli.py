"""What every command line shares: a bad flag or destination refused at once, one line and exit status 2 (as
argparse does), and Ctrl-C reported in one line with exit status 130, saying what was already written.
Everything is checked before the first image is decoded, so a typo never costs a training run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn, TypeVar

from birds_lpft.utils.outputs import output_dir_problem, output_file_problem, write_text

T = TypeVar("T")
USAGE_ERROR = 2  # argparse's exit status for a bad command line
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def fail(prog: str, message: str) -> NoReturn:
    """``prog: error: message`` on stderr, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def read_or_fail(prog: str, flag: str, read: Callable[[], T]) -> T:
    """``read()`` (a checkpoint or a setting that ``flag`` names), or on its ``ValueError`` one line
    ``prog: error: flag: why`` and exit 2: every command refuses what it was given the same way."""
    try:
        return read()
    except ValueError as err:
        fail(prog, f"{flag}: {err}")


def publish(text: str, out: os.PathLike | None) -> None:
    """Print a table a measuring command made and, with ``out``, write the same text there (atomically)."""
    text = text.rstrip("\n") + "\n"
    print(text, end="")
    if out is not None:
        write_text(out, text)


def check_output_file(prog: str, flag: str, path: os.PathLike | None, inputs: Iterable = (),
                      example: str = "birds_model.pt") -> None:
    """Refuse ``flag``'s file destination now (exit 2) if it could not be written at the end (``example``: a file
    name of the kind the flag takes, for the hint when a folder is given)."""
    if path is not None:
        problem = output_file_problem(path, inputs, example)
        if problem:
            fail(prog, f"{flag} {path}: {problem}")


def check_output_dir(prog: str, flag: str, path: os.PathLike | None) -> None:
    """Refuse ``flag``'s folder destination now (exit 2) if files could not be written into it."""
    if path is not None:
        problem = output_dir_problem(path)
        if problem:
            fail(prog, f"{flag} {path}: {problem}")


def add_weights_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say where pretrained weights come from, the same for every command that loads them."""
    parser.add_argument("--weights", type=Path, help="a local pretrained weights file (air-gapped machines), "
                                                     "checked against its published hash, used instead of the cache")
    parser.add_argument("--allow-download", action="store_true", help="let a missing weights file be downloaded")
    parser.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")


def weights_mode(prog: str, args: argparse.Namespace) -> str:
    """'none' (random init) or 'required', once the weights flags are checked together (exit 2): a flag that
    would be ignored is refused, never silently dropped."""
    if args.random_init and (args.weights is not None or args.allow_download):
        flag = "--weights" if args.weights is not None else "--allow-download"
        fail(prog, f"{flag} with --random-init: a random-init run loads no weights; drop one of the two")
    if args.weights is not None and not args.weights.is_file():
        fail(prog, f"--weights {args.weights}: no such file")
    return "none" if args.random_init else "required"


def layout_inputs(data_dir: os.PathLike | None) -> list[Path]:
    """What a command reads from a grader-layout folder: its gt.csv files, classes.txt and image folders
    (an output there would overwrite an input, or be read back as a test image)."""
    if data_dir is None:
        return []
    root = Path(data_dir)
    splits = [root / split for split in ("train", "test")]
    return [root / "classes.txt"] + [s / "gt.csv" for s in splits] + [s / "images" for s in splits]


def run_interruptible(body: Callable[[list[os.PathLike]], T], prog: str) -> T:
    """Run a command's body, which appends each file it writes to the list it is given; Ctrl-C prints ``prog:
    interrupted; nothing was written`` (or what was) and exits 130 instead of a traceback. Writes are atomic, so an
    interrupted one left the old file in place."""
    written: list[os.PathLike] = []
    try:
        return body(written)
    except KeyboardInterrupt:
        done = f"already written: {', '.join(map(os.fspath, written))}" if written else "nothing was written"
        print(f"\n{prog}: interrupted; {done}", file=sys.stderr)
        sys.exit(INTERRUPTED)


def printable(name: str) -> str:
    """A file name safe to print whatever bytes it holds (undecodable ones as \\x.. escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
