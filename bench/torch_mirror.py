"""PyTorch copies of mnn networks, weight for weight: the reference for tests and the benchmark.

mnn never imports torch; only tests/ and bench/ do.
"""
import numpy
import torch
import torch.nn.functional as F

import mnn
from mnn import backend

SIMPLE = {
    mnn.ReluLayer: lambda layer: torch.nn.ReLU(),
    mnn.SigmoidLayer: lambda layer: torch.nn.Sigmoid(),
    mnn.TanhLayer: lambda layer: torch.nn.Tanh(),
    mnn.GeluLayer: lambda layer: torch.nn.GELU(approximate="tanh"),
    mnn.FlattenLayer: lambda layer: torch.nn.Flatten(),
    mnn.DropoutLayer: lambda layer: torch.nn.Dropout(layer.p),
    mnn.MaxPool2dLayer: lambda layer: torch.nn.MaxPool2d(layer.kernel_size, layer.stride),
    mnn.AvgPool2dLayer: lambda layer: torch.nn.AvgPool2d(layer.kernel_size, layer.stride),
    mnn.SoftmaxLayer: lambda layer: torch.nn.Softmax(layer.axis),
    mnn.LogSoftmaxLayer: lambda layer: torch.nn.LogSoftmax(layer.axis),
}

PARAMETRIZED = {  # mnn layer -> (torch module factory, {mnn name: torch name})
    mnn.LinearLayer: (lambda l: torch.nn.Linear(l.in_features, l.out_features, l.bias),
                      {"w": "weight", "b": "bias"}),
    mnn.Conv2dLayer: (lambda l: torch.nn.Conv2d(l.in_channels, l.out_channels, l.kernel_size, l.stride, l.padding,
                                                bias=l.bias), {"w": "weight", "b": "bias"}),
    mnn.BatchNorm2dLayer: (lambda l: torch.nn.BatchNorm2d(l.num_features, l.eps, l.momentum),
                           {"weight": "weight", "bias": "bias"}),
    mnn.BatchNormLayer: (lambda l: torch.nn.BatchNorm1d(l.num_features, l.eps, l.momentum),
                         {"weight": "weight", "bias": "bias"}),
    mnn.LayerNormLayer: (lambda l: torch.nn.LayerNorm(l.dim, l.eps), {"weight": "weight", "bias": "bias"}),
}

LOSSES = {
    mnn.CrossEntropyLossLayer: lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    mnn.NllLossLayer: lambda out, y: F.nll_loss(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    mnn.MSELossLayer: F.mse_loss,
}

EXTRA = {}  # mnn layer type -> converter(layer, pairs, prefix) -> module; registered by GPT support


def as_tensor(array, dtype):
    return torch.tensor(numpy.array(backend.to_numpy(array)), dtype=dtype)


def convert(layer, pairs, prefix, dtype):
    """A torch module for one mnn layer, its weights copied; pairs gets (mnn name, torch parameter)."""
    if isinstance(layer, mnn.SequentialLayers):
        return torch.nn.Sequential(*[convert(sub, pairs, f"{prefix}{i}.", dtype) for i, sub in enumerate(layer.body)])
    for kind, factory in SIMPLE.items():
        if type(layer) is kind:
            return factory(layer)
    if type(layer) in PARAMETRIZED:
        factory, names = PARAMETRIZED[type(layer)]
        module = factory(layer).to(dtype)
        with torch.no_grad():
            for ours, theirs in names.items():
                if ours in layer.params:
                    getattr(module, theirs).copy_(as_tensor(layer.params[ours], dtype))
                    pairs.append((prefix + ours, getattr(module, theirs)))
            for name, value in layer.buffers.items():
                getattr(module, name).copy_(as_tensor(value, dtype))
        return module
    if type(layer) in EXTRA:
        return EXTRA[type(layer)](layer, pairs, prefix, dtype)
    raise TypeError(f"no torch mirror for {type(layer).__name__}")


def mirror(net, dtype=torch.float32):
    """(torch model, loss function, [(mnn parameter name, torch parameter)]) for an mnn network."""
    pairs = []
    model = torch.nn.Sequential(*[convert(layer, pairs, f"{i}.", dtype) for i, layer in enumerate(net.body)])
    return model, LOSSES[type(net.loss_layer)], pairs
