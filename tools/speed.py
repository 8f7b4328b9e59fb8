"""``python -m tools.speed ...``: the same as ``python -m tools.bench speed ...`` (kept for the command's old name)."""

import sys

from birds_lpft.tools.bench import main

main(["speed", *sys.argv[1:]])
