"""Builders for the reference models. Each returns a ``SequentialLayers`` ending in its loss.

A model is described by ``{"name": ..., "kwargs": {...}}``; ``build`` turns that
description back into a network, which is how a checkpoint rebuilds its own model.
"""
from .layers import (BatchNorm2dLayer, Conv2dLayer, CrossEntropyLossLayer, DropoutLayer, FlattenLayer,
                     LinearLayer, MaxPool2dLayer, ReluLayer)
from .seq_layers import SequentialLayers


def mlp(in_features=784, hidden=(512, 256), classes=10, dropout=0.2):
    """Flatten, then [Linear, ReLU, Dropout] per hidden width, a Linear head and cross-entropy."""
    layers, width = [FlattenLayer()], in_features
    for size in hidden:
        layers += [LinearLayer(width, size), ReluLayer()]
        if dropout:
            layers.append(DropoutLayer(dropout))
        width = size
    return SequentialLayers(layers + [LinearLayer(width, classes), CrossEntropyLossLayer()])


def cnn(in_channels=1, image_size=28, channels=(32, 64), hidden=128, classes=10, dropout=0.3, batch_norm=True):
    """Per channel count: conv 3x3 (padding 1), [BatchNorm], max-pool 2, ReLU; then Linear, ReLU, Dropout, Linear.

    Max-pooling before the ReLU computes the same function as after it (ReLU is monotonic,
    so it commutes with max) on a quarter of the entries.
    """
    layers, width, size = [], in_channels, image_size
    for count in channels:
        layers.append(Conv2dLayer(width, count, 3, padding=1, bias=not batch_norm))
        layers += [BatchNorm2dLayer(count)] if batch_norm else []
        layers += [MaxPool2dLayer(2), ReluLayer()]
        width, size = count, size // 2
    layers += [FlattenLayer(), LinearLayer(width * size * size, hidden), ReluLayer()]
    layers += [DropoutLayer(dropout)] if dropout else []
    return SequentialLayers(layers + [LinearLayer(hidden, classes), CrossEntropyLossLayer()])


BUILDERS = {"mlp": mlp, "cnn": cnn}


def build(architecture):
    """A network from ``{"name": "mlp", "kwargs": {...}}``."""
    name = architecture.get("name")
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[name](**architecture.get("kwargs", {}))
