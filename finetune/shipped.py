"""The recipe the grader interface trains with ``fast_train=False`` (``solution.train_classifier``).

None here, in the project: the 'full' preset. ``tools/build_submission.py`` writes the shipped model's own
recipe (``Classifier.recipe``, or ``--preset NAME``'s) into this module's copy inside the grader file, so
that file reproduces that model, whatever backbone or settings it was trained with, and its
``fast_train=True`` smoke run uses the same backbone.
"""

from __future__ import annotations

RECIPE: dict | None = None
