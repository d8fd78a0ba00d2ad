"""``mnn test``: a checkpoint's accuracy on the test split, per class, and its confusion matrix."""
from pathlib import Path

import numpy

from .checkpoint import load_checkpoint
from .data.images import Normalizer, load_images
from .plots import plot_confusion
from .tasks import classify


def confusion_matrix(labels, predicted, classes):
    matrix = numpy.zeros((classes, classes), dtype=numpy.int64)
    numpy.add.at(matrix, (labels, predicted), 1)
    return matrix


def test_checkpoint(path, data_dir=None, out=None):
    """Evaluate an image classifier checkpoint on the test split; write confusion.png beside it.

    The numbers never depend on the picture: where it cannot be written, ``confusion_png``
    says so instead of naming the file."""
    net, document = load_checkpoint(path)
    if "normalizer" not in document:
        raise ValueError(f"{path}: not an image classifier checkpoint (no normaliser stored)")
    dataset = load_images(document["config"]["dataset"], "test", data_dir or document["config"].get("data_dir"))
    images = Normalizer(**document["normalizer"])(dataset.images)
    loss, accuracy, predicted = classify(net, images, dataset.labels)
    matrix = confusion_matrix(dataset.labels, predicted, len(dataset.classes))
    per_class = matrix.diagonal() / numpy.maximum(matrix.sum(axis=1), 1)
    out = Path(out or Path(path).with_name("confusion.png"))
    try:
        plot_confusion(matrix, dataset.classes, out)
        picture = f"confusion matrix: {out}"
    except OSError as error:
        picture = f"confusion matrix not written: {out}: {error.strerror or error}"
    return {"test_loss": loss, "test_accuracy": accuracy,
            "per_class": dict(zip(dataset.classes, per_class.tolist())), "confusion_png": picture}
