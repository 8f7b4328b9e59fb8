"""``python -m probe.weights [--from-file PATH]``: put the verified pretrained weights into the torch hub cache."""

from probe.weights.provision import main

main()
