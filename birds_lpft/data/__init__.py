"""Untrusted input made safe: ``gt.csv`` and class ids (``labels``), labelled image sets in the grader's layout
(``sets``), image decoding with bounded memory (``images``), and a generated demo set (``synthetic``)."""
