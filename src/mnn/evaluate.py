"""``mnn test``: a checkpoint's accuracy on the test split, per class, and its confusion matrix."""
import json
from pathlib import Path

import numpy

from .checkpoint import load_checkpoint
from .data.images import Normalizer, load_images
from .files import atomic_write
from .plots import plot_confusion
from .tasks import classify


def confusion_matrix(labels, predicted, classes):
    matrix = numpy.zeros((classes, classes), dtype=numpy.int64)
    numpy.add.at(matrix, (labels, predicted), 1)
    return matrix


def test_checkpoint(path, data_dir=None, out=None):
    """Evaluate an image classifier checkpoint on the test split; write confusion.png beside it.

    The numbers are also written to test.json beside the picture; the report's ``written``
    lines say where each went, or why it could not be written (a read-only folder): the
    numbers returned never depend on either file."""
    net, document = load_checkpoint(path)
    if "normalizer" not in document:
        raise ValueError(f"{path}: not an image classifier checkpoint (no normaliser stored)")
    dataset = load_images(document["config"]["dataset"], "test", data_dir or document["config"].get("data_dir"))
    images = Normalizer(**document["normalizer"])(dataset.images)
    loss, accuracy, predicted = classify(net, images, dataset.labels)
    matrix = confusion_matrix(dataset.labels, predicted, len(dataset.classes))
    per_class = matrix.diagonal() / numpy.maximum(matrix.sum(axis=1), 1)
    report = {"checkpoint": str(path), "test_loss": loss, "test_accuracy": accuracy,
              "per_class": dict(zip(dataset.classes, per_class.tolist())), "confusion": matrix.tolist()}
    out = Path(out or Path(path).with_name("confusion.png"))
    numbers, text = out.with_name("test.json"), json.dumps(report, indent=1).encode()
    report["written"] = [written(out, "confusion matrix", lambda: plot_confusion(matrix, dataset.classes, out)),
                         written(numbers, "numbers", lambda: atomic_write(numbers, lambda f: f.write(text)))]
    return report


def written(path, what, write):
    """Call ``write()``; a line saying where ``what`` went, or why it could not be written."""
    try:
        write()
        return f"{what}: {path}"
    except OSError as error:
        return f"{what} not written: {path}: {error.strerror or error}"
