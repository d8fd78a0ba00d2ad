"""What a training run learns from: batches by step number, and how to evaluate.

A batch is a pure function of ``(seed, step)``, so a run resumed at step k sees exactly
the batches the uninterrupted run would have seen.
"""
import numpy

from . import backend
from .data.images import Normalizer, load_images

VALIDATION_SIZE = 5000


def to_batch(x, y):
    return backend.to_device(x), backend.to_device(y)


class ImageClassification:
    """Fashion-MNIST or MNIST: a seeded train/validation split, normalised with training statistics."""

    def __init__(self, dataset="fashion-mnist", batch_size=128, seed=0, data_dir=None, limit=None):
        full = load_images(dataset, "train", data_dir)
        order = numpy.random.default_rng(seed).permutation(len(full))
        validation, training = order[:VALIDATION_SIZE], order[VALIDATION_SIZE:]
        if limit:
            training, validation = training[:limit], validation[:max(limit // 5, 1)]
        if len(training) < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the {len(training)} training samples")
        self.classes = full.classes
        self.normalizer = Normalizer.fit(full.images[training])
        self.train_x, self.train_y = self.normalizer(full.images[training]), full.labels[training]
        self.val_x, self.val_y = self.normalizer(full.images[validation]), full.labels[validation]
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(training) // batch_size
        self._epoch_order = (None, None)

    def model_defaults(self):
        return {"classes": len(self.classes)}

    def metadata(self):
        return {"normalizer": vars(self.normalizer), "classes": self.classes}

    def order(self, epoch):
        """The shuffled sample order of one epoch, seeded by (seed, epoch)."""
        if self._epoch_order[0] != epoch:
            rng = numpy.random.default_rng([self.seed, epoch])
            self._epoch_order = (epoch, rng.permutation(len(self.train_y)))
        return self._epoch_order[1]

    def batch(self, step):
        epoch, index = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return to_batch(self.train_x[rows], self.train_y[rows])

    def evaluate(self, net, stop=None):
        """Validation loss and accuracy; None where ``stop()`` turned true midway (the evaluation is abandoned)."""
        result = classify(net, self.val_x, self.val_y, stop=stop)
        if result is None:
            return None
        loss, accuracy, _ = result
        return {"val_loss": loss, "val_accuracy": accuracy}


def classify(net, images, labels, chunk=1000, stop=None):
    """Mean loss, accuracy and predicted labels of ``net`` in eval mode over a data set;
    None where ``stop()`` turns true between two chunks."""
    net.eval()
    losses, predictions = [], []
    try:
        for start in range(0, len(labels), chunk):
            if stop is not None and stop():
                return None
            x, y = to_batch(images[start:start + chunk], labels[start:start + chunk])
            scores = net(x)
            losses.append(float(net.loss_layer.forward(scores, y)) * len(y))
            predictions.append(backend.to_numpy(scores.argmax(axis=-1)))
    finally:
        net.train()
    predicted = numpy.concatenate(predictions)
    return sum(losses) / len(labels), float((predicted == labels).mean()), predicted
