"""The grader interface (see GRADER.md): ``train_classifier`` and ``classify``; it only wires the stages.

``python tools/build_submission.py`` turns it and the project modules it uses into the self-contained
``classification.py`` uploaded next to ``birds_model.pt``. ``classify`` needs neither Lightning nor scikit-learn, so
they are imported only inside ``train_classifier``, without the temp-dir probe file importing Lightning would create.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import labelled_from_gt, list_image_files, read_class_names
from birds_lpft.recipe import grader_recipe
from birds_lpft.utils.sandbox import no_tempdir_probe

# What train_classifier(fast_train=False) trains: None here, the 'full' preset; in a built grader file, the
# shipped model's own recipe (tools/build_submission.py writes it on this line), so that file reproduces it.
SHIPPED_RECIPE: dict | None = None


def train_classifier(train_gt: dict, train_img_dir: str, fast_train: bool = True) -> Classifier:
    """Train the bird classifier on ``train_gt`` ({filename: class_id}) and the images in ``train_img_dir``.

    ``fast_train`` runs the small 'fast' preset (on the shipped recipe's backbone) on the CPU, writing nothing and
    never downloading (cached pretrained weights, else random init with a warning). Otherwise the shipped recipe
    (``SHIPPED_RECIPE``) reproduces ``birds_model.pt``; it needs the pretrained weights (cached or downloadable).
    ``model.save("birds_model.pt")`` writes the returned model's checkpoint.
    """
    with no_tempdir_probe():  # training only: see the module docstring
        from finetune.train import fine_tune

    images = labelled_from_gt(train_gt, train_img_dir, where="train_gt")
    # The grader layout keeps classes.txt at the data root, two levels above train/images.
    images = replace(images, class_names=read_class_names(Path(train_img_dir).parent.parent / "classes.txt",
                                                          images.num_classes))
    cfg = grader_recipe(fast_train, SHIPPED_RECIPE)
    weights = "if-cached" if fast_train else "required"
    result = fine_tune(images, cfg, weights, allow_download=not fast_train, accelerator="cpu", devices=1)
    return result.classifier


def classify(model_path: str, test_img_dir: str) -> dict[str, int]:
    """Predict a class id for every file in ``test_img_dir`` with the model at ``model_path``: {filename: class id}.

    Runs on the CPU in-process (no workers), in batches. An unreadable file, or any file under a model whose weights
    are not finite, still gets a label with a warning: a missing key scores zero, a wrong label does not.
    """
    model = Classifier.load(model_path, allow_nonfinite=True)
    files = list_image_files(test_img_dir)
    if not files:
        return {}
    return {p.name: int(k) for p, k in zip(files, model.predict(files, [p.name for p in files]), strict=True)}

