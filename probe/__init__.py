"""Stage one of LP-FT: frozen-backbone features in RAM and a scikit-learn linear probe.

Also home to what both stages share: the data layer (``probe.data``), backbones and preprocessing
(``probe.backbone``) and the offline pretrained weights (``probe.weights``).
"""
