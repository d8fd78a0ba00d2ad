"""PNG figures of a run: loss and accuracy curves, the confusion matrix."""
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402

from .files import atomic_write  # noqa: E402


def plot_curves(metrics, path):
    """Training and validation loss (left) and validation accuracy (right) against step."""
    steps = [m["step"] for m in metrics]
    accuracy = [m.get("val_accuracy") for m in metrics]
    has_accuracy = any(a is not None for a in accuracy)
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6, 4), squeeze=False)
    loss_axis = axes[0][0]
    loss_axis.plot(steps, [m["train_loss"] for m in metrics], marker="o", label="train")
    loss_axis.plot(steps, [m["val_loss"] for m in metrics], marker="o", label="validation")
    loss_axis.set(xlabel="step", ylabel="loss", title="loss")
    loss_axis.legend()
    if has_accuracy:
        axes[0][1].plot(steps, accuracy, marker="o", color="C2")
        axes[0][1].set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    figure.tight_layout()
    save_figure(figure, path)


LABELLED_CLASSES = 30  # beyond, a cell's count and a class's name no longer fit: the colours alone tell


def plot_confusion(matrix, classes, path):
    """Rows: true class; columns: predicted class; each cell its count (for up to ``LABELLED_CLASSES``)."""
    figure, axis = plt.subplots(figsize=(8, 7))
    axis.imshow(matrix, cmap="Blues")
    axis.set(xlabel="predicted", ylabel="true", title="confusion matrix (test set)")
    if len(classes) > LABELLED_CLASSES:  # 160,000 texts for 400 classes took a minute and a half to draw
        figure.colorbar(axis.images[0], ax=axis, label="count")
    else:
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axis.set_yticks(range(len(classes)), classes)
        for (row, column), count in numpy.ndenumerate(matrix):
            axis.text(column, row, int(count), ha="center", va="center",
                      color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    with warnings.catch_warnings():  # a class name in a script the font lacks is drawn as boxes, not told twice
        warnings.filterwarnings("ignore", "Glyph .* missing from", UserWarning)
        figure.tight_layout()
        save_figure(figure, path)


def save_figure(figure, path):
    """Write the figure as PNG atomically (a reader never sees half a picture), then close it."""
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(figure)
