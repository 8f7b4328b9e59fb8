"""Trace ``import classification`` + ``classify`` at the syscall level and list every file they write.

    python tools/trace_writes.py IMAGE_DIR [--submission submission/] [--python PY] [--limit-as 6GiB]

Comparing folders before and after misses a file created and deleted at once (a temp-dir probe, a
semaphore in /dev/shm); ``strace -f`` does not. The child runs in a fresh copy of the two built files with
fresh HOME and TMPDIR, CUDA hidden, optionally under an address-space limit (``ulimit -v``), and
PYTHONDONTWRITEBYTECODE=1 (a ``__pycache__`` next to the uploaded file would be the importing
interpreter's write, before any of its code runs). Prints each create, truncate, open-for-writing, rename,
delete or mkdir, how many files got a label, the time and the peak memory. As in ``grader_check``, the
on-disk project is blocked (only the file's embedded modules load). Exit status 1 on any write, any file
without an integer label, or any project module that did not come from the file's embedded table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from birds_lpft.data.sets import list_image_files
from birds_lpft.tools.grader_check import PROJECT_GUARD, child_env, child_result, sandbox

from finetune.cache import parse_size

CHILD = PROJECT_GUARD + r"""
import json, time
t = time.perf_counter()
import classification
imported = time.perf_counter() - t
t = time.perf_counter()
pred = classification.classify(os.path.abspath("birds_model.pt"), sys.argv[1])
seconds = time.perf_counter() - t
print("TRACE_RESULT " + json.dumps({"labels": pred, "import_s": imported, "classify_s": seconds, "peak_mib": peak(),
                                    "lightning": "lightning" in sys.modules, "sklearn": "sklearn" in sys.modules,
                                    "project_modules": len(project_modules()),
                                    "not_embedded": not_embedded(classification)}))
"""
SYSCALLS = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,truncate,ftruncate,link,symlink"
WRITING = re.compile(r"O_CREAT|O_TRUNC|O_WRONLY|O_RDWR"
                     r"|\b(creat|mkdir|mkdirat|rename\w*|unlink\w*|truncate|link|symlink)\(")


def writes(trace: str) -> list[str]:
    """The trace lines that create, truncate, open for writing, rename, delete or make something."""
    return [line.strip() for line in trace.splitlines()
            if WRITING.search(line) and '"/dev/null"' not in line and "= -1" not in line]


def run(python: str, submission: Path, images: Path, limit_as: str | None) -> tuple[dict, list[str]]:
    with sandbox(submission, "trace_writes_") as places:
        trace_file = places["workdir"].parent / "trace.txt"
        inner = ["strace", "-f", "-qq", "-e", f"trace={SYSCALLS}", "-o", str(trace_file), python, "-c", CHILD,
                 str(images.resolve())]
        cmd = ["bash", "-c", f'ulimit -v {limit_as} && exec "$@"', "_", *inner] if limit_as else inner
        proc = subprocess.run(cmd, cwd=places["workdir"], env=child_env(places), capture_output=True, text=True)
        return child_result(proc, "TRACE_RESULT", "trace_writes: the child failed"), writes(trace_file.read_text())


def kib(text: str) -> str:
    """'6GiB' -> ulimit -v's KiB (the sizes ``finetune.cache.parse_size`` reads); under 1 MiB is a slip."""
    try:
        size = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size < 2**20:
        raise argparse.ArgumentTypeError(f"{text!r} is under 1 MiB, too little to run Python; write e.g. 6GiB")
    return str(size // 1024)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", type=Path, help="the folder to classify")
    p.add_argument("--submission", type=Path, default=Path("submission"), help="folder with the two built files")
    p.add_argument("--python", default=sys.executable, help="interpreter of the grader-like environment")
    p.add_argument("--limit-as", type=kib, help="address-space limit of the child, e.g. 6GiB")
    args = p.parse_args(argv)
    if shutil.which("strace") is None:
        raise SystemExit("trace_writes: strace is not installed (apt-get install strace)")
    python = str(Path(args.python).absolute()) if os.sep in args.python else args.python
    out, found = run(python, args.submission, args.images, args.limit_as)
    expected = {f.name for f in list_image_files(args.images)}
    unlabelled = sorted(expected - {k for k, v in out["labels"].items() if type(v) is int})
    print(f"import classification: {out['import_s']:.1f}s (imports lightning: {out['lightning']}, "
          f"scikit-learn: {out['sklearn']})")
    print(f"classify: {len(out['labels'])} of {len(expected)} files labelled in {out['classify_s']:.1f}s "
          f"({len(out['labels']) / max(out['classify_s'], 1e-9):.1f} files/s), peak RSS {out['peak_mib']:.0f} MiB"
          + (f", address space limited to {int(args.limit_as) // 1024} MiB" if args.limit_as else ""))
    print(f"files without an integer label: {unlabelled or 'none'}")
    print(f"project modules loaded: {out['project_modules']}, not from classification.py's embedded table: "
          f"{out['not_embedded'] or 'none'}")
    print(f"write-type syscalls (strace -f): {len(found)}")
    for line in found:
        print("  " + line)
    sys.exit(1 if found or unlabelled or out["not_embedded"] else 0)


if __name__ == "__main__":
    main()
