"""Builders for the reference models. Each returns a ``SequentialLayers`` ending in its loss.

A model is described by ``{"name": ..., "kwargs": {...}}``; ``build`` turns that
description back into a network, which is how a checkpoint rebuilds its own model.
"""
from .layers import CrossEntropyLossLayer, DropoutLayer, FlattenLayer, LinearLayer, ReluLayer
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


BUILDERS = {"mlp": mlp}


def build(architecture):
    """A network from ``{"name": "mlp", "kwargs": {...}}``."""
    name = architecture.get("name")
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[name](**architecture.get("kwargs", {}))
