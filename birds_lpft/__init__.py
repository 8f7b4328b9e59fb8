"""The foundation both stages and ``classify`` share: image sets and decoding (``data``), backbones, weights and
preprocessing (``models``), the trained classifier and its checkpoint (``classifier``), the one prediction path
(``predict``), batched in-RAM forward passes (``extract``) and the helpers every command uses (``utils``).
Stage one (``probe``) and stage two (``finetune``) build on it; it imports neither.
"""
