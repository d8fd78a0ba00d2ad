"""mnn — Manual Neural Networks: every backward pass derived by hand, no autograd.

``import mnn`` is quick: each name below is imported the first time it is used
(``mnn.LinearLayer``, ``mnn.optim``, ...), so the ``mnn`` command starts at once.
"""
import importlib

__version__ = "0.1.0"

_LAYERS = [
    "Layer", "LossLayer", "CompositeLayer", "LinearLayer", "MatrixProduct", "ReluLayer", "SigmoidLayer", "TanhLayer",
    "GeluLayer", "SoftmaxLayer", "LogSoftmaxLayer", "MSELossLayer", "NllLossLayer", "CrossEntropyLossLayer",
    "DropoutLayer", "FlattenLayer", "Conv2dLayer", "MaxPool2dLayer", "AvgPool2dLayer", "BatchNormLayer",
    "BatchNorm2dLayer", "LayerNormLayer", "EmbeddingLayer", "PositionalEmbeddingLayer", "MultiHeadAttention",
    "ResidualBlock", "RNNLayer", "LSTMLayer", "GRULayer",
]
_WHERE = {"load": ".predict", "SequentialLayers": ".seq_layers", **{name: ".layers" for name in _LAYERS}}
_MODULES = ["backend", "gradcheck", "optim", "layers", "models", "data", "checkpoint", "kernels"]

__all__ = [*_MODULES, "load", "SequentialLayers", *_LAYERS]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mnn' has no attribute {name!r}")


def __dir__():  # the public names, not this file's own plumbing
    return sorted({"__version__", *__all__})
