"""Stage one of LP-FT: frozen-backbone features extracted in RAM, a scikit-learn linear probe fitted on them and
folded into the network's linear head (``linear``); stage one end to end (``pipeline``), backbones compared by
probe (``compare``), and the offline weights' provisioning (``weights``, ``python -m probe.weights``)."""
