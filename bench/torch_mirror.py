"""PyTorch copies of mnn networks, weight for weight: the reference for tests and the benchmark.

mnn never imports torch; only tests/ and bench/ do.
"""
import math

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

AFFINE = {"weight": "weight", "bias": "bias"}
PARAMETRIZED = {  # mnn layer -> (torch module factory, {mnn name: torch name})
    mnn.LinearLayer: (lambda layer: torch.nn.Linear(layer.in_features, layer.out_features, layer.bias),
                      {"w": "weight", "b": "bias"}),
    mnn.Conv2dLayer: (lambda layer: torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                                    layer.stride, layer.padding, bias=layer.bias),
                      {"w": "weight", "b": "bias"}),
    mnn.BatchNorm2dLayer: (lambda layer: torch.nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum), AFFINE),
    mnn.BatchNormLayer: (lambda layer: torch.nn.BatchNorm1d(layer.num_features, layer.eps, layer.momentum), AFFINE),
    mnn.LayerNormLayer: (lambda layer: torch.nn.LayerNorm(layer.dim, layer.eps, bias=layer.bias), AFFINE),
    mnn.EmbeddingLayer: (lambda layer: torch.nn.Embedding(layer.num_embeddings, layer.dim), {"weight": "weight"}),
    mnn.PositionalEmbeddingLayer: (lambda layer: AddPositions(layer.context, layer.dim), {"weight": "weight"}),
}
RECURRENT = {"weight_ih": "weight_ih_l0", "weight_hh": "weight_hh_l0", "bias_ih": "bias_ih_l0",
             "bias_hh": "bias_hh_l0"}

LOSSES = {
    mnn.CrossEntropyLossLayer: lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    mnn.NllLossLayer: lambda out, y: F.nll_loss(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
    mnn.MSELossLayer: F.mse_loss,
}

def outputs_only(module_class):
    """``torch.nn.RNN``/``LSTM``/``GRU`` returning only the outputs (torch's return (outputs, final state)),
    so that it sits in a ``torch.nn.Sequential`` as mnn's recurrent layers sit in a network."""
    class OutputsOnly(module_class):
        def forward(self, x):
            return super().forward(x)[0]

    OutputsOnly.__name__ = module_class.__name__
    return OutputsOnly


for _mnn_class, _torch_class in ((mnn.RNNLayer, torch.nn.RNN), (mnn.LSTMLayer, torch.nn.LSTM),
                                 (mnn.GRULayer, torch.nn.GRU)):
    PARAMETRIZED[_mnn_class] = (
        lambda layer, cls=outputs_only(_torch_class): cls(layer.input_size, layer.hidden_size, bias=layer.bias,
                                                          batch_first=True), RECURRENT)


class AddPositions(torch.nn.Module):
    def __init__(self, context, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(context, dim))

    def forward(self, x):
        return x + self.weight[: x.shape[1]]


class Residual(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class CausalSelfAttention(torch.nn.Module):
    """nanoGPT's attention: fused c_attn, scaled dot-product attention, c_proj; with dropout on the
    attention weights, nanoGPT's explicit path (its ``attn_dropout`` module, which tests can replace)."""

    def __init__(self, dim, heads, causal, bias, dropout=0.0):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.c_attn, self.c_proj = torch.nn.Linear(dim, 3 * dim, bias), torch.nn.Linear(dim, dim, bias)
        self.attn_dropout = torch.nn.Dropout(dropout) if dropout else None

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = (part.view(batch, length, self.heads, -1).transpose(1, 2)
                   for part in self.c_attn(x).split(dim, dim=2))
        if self.attn_dropout is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(k.shape[-1])
            if self.causal:
                hidden = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(hidden, float("-inf"))
            y = self.attn_dropout(F.softmax(scores, dim=-1)) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, dim))


def convert_attention(layer, pairs, prefix, dtype, shared):
    dropout = layer.dropout.p if layer.dropout else 0.0
    module = CausalSelfAttention(layer.dim, layer.heads, layer.causal, layer.bias, dropout).to(dtype)
    copy_params(layer.qkv, module.c_attn, {"w": "weight", "b": "bias"}, pairs, f"{prefix}qkv.", dtype, shared)
    copy_params(layer.proj, module.c_proj, {"w": "weight", "b": "bias"}, pairs, f"{prefix}proj.", dtype, shared)
    return module


EXTRA = {
    mnn.MultiHeadAttention: convert_attention,
    mnn.ResidualBlock: lambda layer, pairs, prefix, dtype, shared: Residual(
        convert(layer.body, pairs, prefix, dtype, shared)),
}


def as_tensor(array, dtype):
    return torch.tensor(numpy.array(backend.to_numpy(array)), dtype=dtype)


def copy_params(layer, module, names, pairs, prefix, dtype, shared):
    """Copy mnn parameters into torch ones; an array seen before (tied weights) shares its Parameter."""
    with torch.no_grad():
        for ours, theirs in names.items():
            if ours not in layer.params:
                continue
            array = layer.params[ours]
            if id(array) in shared:
                setattr(module, theirs, shared[id(array)])
                continue
            getattr(module, theirs).copy_(as_tensor(array, dtype))
            shared[id(array)] = getattr(module, theirs)
            pairs.append((prefix + ours, getattr(module, theirs)))
        for name, value in layer.buffers.items():
            getattr(module, name).copy_(as_tensor(value, dtype))


def convert(layer, pairs, prefix, dtype, shared):
    """A torch module for one mnn layer, its weights copied; pairs gets (mnn name, torch parameter)."""
    if isinstance(layer, mnn.SequentialLayers):
        return torch.nn.Sequential(*[convert(sub, pairs, f"{prefix}{i}.", dtype, shared)
                                     for i, sub in enumerate(layer.body)])
    for kind, factory in SIMPLE.items():
        if type(layer) is kind:
            return factory(layer)
    if type(layer) in PARAMETRIZED:
        factory, names = PARAMETRIZED[type(layer)]
        module = factory(layer).to(dtype)
        copy_params(layer, module, names, pairs, prefix, dtype, shared)
        return module
    if type(layer) in EXTRA:
        return EXTRA[type(layer)](layer, pairs, prefix, dtype, shared)
    raise TypeError(f"no torch mirror for {type(layer).__name__}")


def mirror(net, dtype=torch.float32):
    """(torch model, loss function, [(mnn parameter name, torch parameter)]) for an mnn network."""
    pairs, shared = [], {}
    model = torch.nn.Sequential(*[convert(layer, pairs, f"{i}.", dtype, shared) for i, layer in enumerate(net.body)])
    return model, LOSSES.get(type(net.loss_layer)), pairs
