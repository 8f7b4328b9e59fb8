"""Every file the project writes: atomically, and only to a destination checked before the work starts.

:func:`atomic_write` fsyncs a temporary file in the target's folder and ``os.replace``-s it over the target, so a
reader, a full disk, a Ctrl-C, a crash or a racing writer sees the old file or one complete new one, never a stub or a
mix. :func:`output_file_problem` and :func:`output_dir_problem` say why a destination could not be written, up front.
:func:`markdown_table` is the one table format the tools print and write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path`` whole.

    ``mode`` is 'wb' or 'w' (text: pass ``encoding``, ``newline``, ``errors`` as to ``open``). On an error the
    temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(target))  # mkstemp's 0600 would make a shared model unreadable to others
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _mode_for(target: Path) -> int:
    """The permission bits the new file gets: the replaced file's, else what ``open`` would give (0666 - umask)."""
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """``Path.write_text``, atomically."""
    with atomic_write(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path.write_bytes``, atomically."""
    with atomic_write(path) as f:
        f.write(data)


def markdown_table(header: Iterable, rows: Iterable[Iterable]) -> str:
    """A Markdown table, without a final newline: the first column left-aligned, the others (figures) right-aligned."""
    header = list(header)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``shutil.copyfile``, atomically at the target."""
    with open(source, "rb") as src, atomic_write(target) as dst:
        shutil.copyfileobj(src, dst)


def output_file_problem(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                        example: str = "birds_model.pt") -> str | None:
    """Why ``path`` could not be written as a file, or None when it can.

    ``inputs`` are the files and folders the command reads: writing over one or into one is refused. ``example`` is
    a file name of the kind expected, for the hint when ``path`` is a folder.
    """
    target = Path(path)
    if target.is_dir():
        return f"{target} is a folder; give a file name inside it, e.g. {target / example}"
    if target.exists() and not target.is_file():
        return f"{target} exists and is not a regular file"
    for source in map(Path, inputs):
        if _same_file(target, source):
            return f"{target} is an input of this command; writing it would destroy that input"
        if source.is_dir() and _same_file(target.parent, source):
            return f"{target} is inside {source}, an input folder of this command"
    return _folder_problem(target.parent if str(target.parent) else Path("."))


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why files could not be written into folder ``path`` (created with its parents if missing), or None."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        return f"{folder} exists and is not a folder"
    existing = folder
    while not existing.exists():  # the folder is created later: the first existing ancestor must take it
        existing = existing.parent
    return _folder_problem(existing)


def _folder_problem(folder: Path) -> str | None:
    if not folder.exists():
        return f"the folder {folder} does not exist; create it first"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    # os.access also answers for read-only mounts (EROFS), even for root
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
