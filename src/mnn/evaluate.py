"""``mnn test``: a checkpoint's accuracy on the test split, per class, and its confusion matrix."""
import json
from pathlib import Path

import numpy

from .checkpoint import load_checkpoint
from .data.custom import has_test_split, load_custom
from .data.images import Normalizer
from .files import atomic_write, quoted, remove_stale_temporaries
from .runs import CONFUSION, TEST_NUMBERS
from .plots import plot_confusion
from .predict import input_shape
from .tasks import classify, load_split


def confusion_matrix(labels, predicted, classes):
    matrix = numpy.zeros((classes, classes), dtype=numpy.int64)
    numpy.add.at(matrix, (labels, predicted), 1)
    return matrix


def test_checkpoint(path, data_dir=None, out=None, data=None):
    """Evaluate an image classifier checkpoint on the test split; write confusion.png beside it.

    The test split is the one of the data set the model trained on, or the images at ``data``
    (see :func:`test_split`). The numbers are also written to test.json beside the picture;
    the report's ``written`` lines say where each went, or why it could not be written (a
    read-only folder): the numbers returned never depend on either file."""
    net, document = load_checkpoint(path)
    if "vocab" in document:
        raise ValueError(f"{path}: a text model, not an image classifier: its held-out loss is the val_loss in "
                         "its run's metrics.json; sample from it with mnn generate")
    if "normalizer" not in document:
        raise ValueError(f"{path}: not an image classifier checkpoint (no normaliser stored)")
    try:
        dataset = test_split(path, document, data_dir, data)
    except FileNotFoundError as error:
        if data_dir is not None or data is not None:
            raise
        raise FileNotFoundError(f"{error}; if it moved, give its new place: mnn test {quoted(path)} --data-dir FOLDER "
                                "(a built-in data set) or --data PATH (your own test images)") from error
    images = Normalizer(**document["normalizer"])(dataset.images)
    loss, accuracy, predicted = classify(net, images, dataset.labels)
    matrix = confusion_matrix(dataset.labels, predicted, len(dataset.classes))
    counts = matrix.sum(axis=1)  # a class with no test images has no accuracy: None (null in test.json)
    per_class = [float(right / count) if count else None for right, count in zip(matrix.diagonal(), counts)]
    report = {"checkpoint": str(path), "test_loss": loss, "test_accuracy": accuracy,
              "per_class": dict(zip(dataset.classes, per_class)), "confusion": matrix.tolist()}
    out = Path(out or Path(path).with_name(CONFUSION))
    numbers, text = out.with_name(TEST_NUMBERS), json.dumps(report, indent=1).encode()
    for path in (out, numbers):  # what an earlier mnn test, killed while writing, left
        remove_stale_temporaries(path)
    report["written"] = [written(out, "confusion matrix", lambda: plot_confusion(matrix, dataset.classes, out)),
                         written(numbers, "numbers", lambda: atomic_write(numbers, lambda f: f.write(text)))]
    return report


def test_split(path, document, data_dir=None, data=None):
    """The images to test the checkpoint at ``path`` on, checked to be the shape the model takes.

    With ``data``: the images there, in any of the forms ``mnn train --data`` takes (an .npz
    gives its x_test and y_test), their labels matched to the model's classes by name. Else
    the test split of the data set the model trained on: a built-in one's, or an .npz's
    x_test and y_test; an image folder or a CSV has none, so its run needs ``data``."""
    config, shape = document["config"], input_shape(document)
    if data is None and config["dataset"] != "custom":
        dataset = load_split(config["dataset"], "test", data_dir or config.get("data_dir"))
        source = config["dataset"]
    else:
        source = Path(data if data is not None else config["data"])
        if not has_test_split(source):
            if data is None:
                raise ValueError(f"{path} trained on {source}, which holds no test split (only an .npz's x_test and "
                                 "y_test are one): test it on held-out images with --data PATH")
            if config.get("data") is not None and source.resolve() == Path(config["data"]).resolve():
                raise ValueError(f"{source} is the data set {path} trained on: test it on held-out images")
        if "classes" not in document:
            raise ValueError(f"{path}: holds no class names to match the labels of {source} with")
        dataset = load_custom(source, "test", document["classes"], shape[0])
    if tuple(dataset.images.shape[1:]) != tuple(shape):
        raise ValueError(f"{source}: images of shape (C, H, W) = {tuple(dataset.images.shape[1:])}; the model takes "
                         f"{tuple(shape)}")
    return dataset


def written(path, what, write):
    """Call ``write()``; a line saying where ``what`` went, or why it could not be written."""
    try:
        write()
        return f"{what}: {path}"
    except OSError as error:
        return f"{what} not written: {path}: {error.strerror or error}"
