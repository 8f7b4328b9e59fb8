"""The foundation both stages and ``classify`` share: labelled image sets and decoding (``data``), backbones,
their weights and preprocessing (``models``), the trained classifier and its checkpoint (``classifier``), the
one prediction path (``predict``), batched in-RAM forward passes (``extract``), and the helpers every command
uses (``utils``: atomic writes, checked settings, command lines, timing).

Stage one (``probe``) and stage two (``finetune``) build on it; it imports neither.
"""
