"""``python -m tools.backbones ...``: the same as ``python -m tools.bench backbones ...`` (the command's old name)."""

import sys

from birds_lpft.tools.bench import main

main(["backbones", *sys.argv[1:]])
