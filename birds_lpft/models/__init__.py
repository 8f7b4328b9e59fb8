"""Backbones by name (``zoo``), the network split into trunk and tail (``net``), pretrained weights found offline
and checked (``weights``), and the preprocessing the weights define (``preprocess``)."""
