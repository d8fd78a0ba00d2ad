"""What a training run learns from: batches by step number, and how to evaluate.

A batch is a pure function of ``(seed, step)``, so a run resumed at step k sees exactly
the batches the uninterrupted run would have seen.
"""
import contextlib
import hashlib

import numpy

from . import backend
from .data.images import Normalizer, load_images
from .distributed import ONE_PROCESS

VALIDATION_SIZE = 5000  # images held out for validation, at most
VALIDATION_FRACTION = 10  # ... and at most one in this many: 10%


def to_batch(x, y):
    return backend.to_device(x), backend.to_device(y)


def validation_size(count):
    """Images held out of ``count`` training images: 10%, at most 5000, at least 1.

    Fashion-MNIST's and MNIST's 60,000 and CIFAR-10's 50,000 give 5000, as mnn always held out."""
    if count < 2:
        raise ValueError(f"{count} training image{'' if count == 1 else 's'}: at least two are needed, one to train "
                         "on and one to validate with")
    return min(VALIDATION_SIZE, max(1, count // VALIDATION_FRACTION))


def load_split(dataset, split, data_dir=None, data=None):
    """The ``split`` of a built-in image data set (fashion-mnist, mnist, cifar10), or of your own
    (``dataset`` "custom", at the path ``data``)."""
    if dataset == "custom":
        from .data.custom import load_custom
        return load_custom(data, split)
    if dataset == "cifar10":
        from .data.cifar import load_cifar10
        return load_cifar10(split, data_dir)
    return load_images(dataset, split, data_dir)


def fingerprint(*arrays):
    """The sha256 of the arrays' dtypes, shapes and values: a resumed run checks with it that its data
    is the data it began with (a relabelled image or an edited text keeps the classes and the vocabulary)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = numpy.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))  # one hash on any machine
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.reshape(-1).view(numpy.uint8))
    return digest.hexdigest()


class ImageClassification:
    """Images and classes: a seeded train/validation split, normalised with training statistics.

    The data set is a built-in one (Fashion-MNIST, MNIST, CIFAR-10) or your own (``dataset``
    "custom" and the path ``data``: see ``mnn.data.custom``). The input shape and the number
    of classes come from the data, and the model's settings follow them (``model_defaults``).
    """

    def __init__(self, dataset="fashion-mnist", batch_size=128, seed=0, data_dir=None, limit=None, data=None,
                 model=None):
        full = load_split(dataset, "train", data_dir, data)
        self.fingerprint = fingerprint(full.images, full.labels)
        self.input_shape = tuple(int(n) for n in full.images.shape[1:])
        _, height, width = self.input_shape
        if model == "cnn" and height != width:
            raise ValueError(f"{data or dataset}: images of {width} x {height} pixels; the CNN takes square images "
                             "(crop or resize them, or train the mlp, which takes any shape)")
        order = numpy.random.default_rng(seed).permutation(len(full))
        held_out = validation_size(len(full))
        validation, training = order[:held_out], order[held_out:]
        if limit:
            training, validation = training[:limit], validation[:max(limit // 5, 1)]
        if len(training) < batch_size:
            left = " that --limit leaves" if limit else " left after the validation split"
            raise ValueError(f"the batch size, {batch_size}, exceeds the {len(training)} training samples{left}: "
                             f"give --batch-size {len(training)} or less")
        self.classes, self.model = full.classes, model
        try:
            self.normalizer = Normalizer.fit(full.images[training])
        except ValueError as error:  # the split the seed and --limit left (the data's own check saw it all)
            raise ValueError(f"{data or data_dir or dataset}: the {len(training)} training images left after the "
                             f"validation split{' and --limit' if limit else ''}: {error}") from error
        self.train_x, self.train_y = self.normalizer(full.images[training]), full.labels[training]
        self.val_x, self.val_y = self.normalizer(full.images[validation]), full.labels[validation]
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(training) // batch_size
        self._epoch_order = (None, None)

    def model_defaults(self):
        """The settings the data decides: the classes, and the input the model takes."""
        channels, height, width = self.input_shape
        inputs = {"mlp": {"in_features": channels * height * width},
                  "cnn": {"in_channels": channels, "image_size": height}}.get(self.model, {})
        return {**inputs, "classes": len(self.classes)}

    def metadata(self):
        return {"normalizer": vars(self.normalizer), "classes": self.classes, "input_shape": list(self.input_shape),
                "data_sha256": self.fingerprint}

    def order(self, epoch):
        """The shuffled sample order of one epoch, seeded by (seed, epoch)."""
        if self._epoch_order[0] != epoch:
            rng = numpy.random.default_rng([self.seed, epoch])
            self._epoch_order = (epoch, rng.permutation(len(self.train_y)))
        return self._epoch_order[1]

    def batch(self, step, share=slice(None)):
        """The global batch of ``step``, or the ``share`` of its rows that one rank trains on."""
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size][share]
        return to_batch(self.train_x[rows], self.train_y[rows])

    def evaluate(self, net, stop=None, ranks=ONE_PROCESS):
        """Validation loss and accuracy; None where ``stop()`` turned true midway (the evaluation is abandoned).
        With several ``ranks``, each evaluates its own chunks and the sums are added up."""
        def loss_and_hits(start, end):
            scores, labels = net(backend.to_device(self.val_x[start:end])), self.val_y[start:end]
            loss = float(net.loss_layer.forward(scores, backend.to_device(labels))) * (end - start)
            return loss, int((backend.to_numpy(scores.argmax(axis=-1)) == labels).sum())

        totals = chunk_sums(net, len(self.val_y), 1000, loss_and_hits, 2, ranks, stop)
        if totals is None:
            return None
        loss, hits = totals / len(self.val_y)
        return {"val_loss": float(loss), "val_accuracy": float(hits)}


def chunk_sums(net, count, chunk, measure, width, ranks=ONE_PROCESS, stop=None):
    """The sums, over the chunks of ``range(count)``, of the ``width`` numbers ``measure(start, end)``
    returns, with ``net`` in eval mode; None where ``stop()`` turns true between two chunks.

    The chunks are dealt to the ranks in turn, and the ranks decide together whether to stop,
    so that all of them abandon the same round."""
    starts = range(0, count, chunk)
    totals = numpy.zeros(width)
    with evaluating(net):
        for first in range(0, len(starts), ranks.size):
            if stop is not None and ranks.any(stop()):
                return None
            if first + ranks.rank < len(starts):
                start = starts[first + ranks.rank]
                totals += measure(start, min(start + chunk, count))
    return ranks.sum(totals)


@contextlib.contextmanager
def evaluating(net):
    """``net`` in eval mode inside, and back in the mode it came in after: a caller evaluating or sampling
    in the middle of training goes on training with dropout."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def classify(net, images, labels, chunk=1000):
    """Mean loss, accuracy and predicted labels of ``net`` in eval mode over a data set."""
    predictions = []

    def loss_and_predictions(start, end):
        x, y = to_batch(images[start:end], labels[start:end])
        scores = net(x)
        predictions.append(backend.to_numpy(scores.argmax(axis=-1)))
        return [float(net.loss_layer.forward(scores, y)) * len(y)]

    (loss,) = chunk_sums(net, len(labels), chunk, loss_and_predictions, 1)
    predicted = numpy.concatenate(predictions)
    return loss / len(labels), float((predicted == labels).mean()), predicted
