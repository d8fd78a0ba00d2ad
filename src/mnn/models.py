"""Builders for the reference models. Each returns a ``SequentialLayers`` ending in its loss.

A model is described by ``{"name": ..., "kwargs": {...}}``; ``build`` turns that
description back into a network, which is how a checkpoint rebuilds its own model.
"""
import inspect
import math

from . import backend
from .layers import (
    BatchNorm2dLayer,
    Conv2dLayer,
    CrossEntropyLossLayer,
    DropoutLayer,
    EmbeddingLayer,
    FlattenLayer,
    GeluLayer,
    LayerNormLayer,
    LinearLayer,
    LSTMLayer,
    MaxPool2dLayer,
    MultiHeadAttention,
    PositionalEmbeddingLayer,
    ReluLayer,
    ResidualBlock,
)
from .seq_layers import SequentialLayers


def mlp(in_features=784, hidden=(512, 256), classes=10, dropout=0.2):
    """Flatten, then [Linear, ReLU, Dropout] per hidden width, a Linear head and cross-entropy."""
    return SequentialLayers([FlattenLayer(), *dense_head(in_features, hidden, classes, dropout)])


def cnn(in_channels=1, image_size=28, channels=(32, 64), hidden=(128,), classes=10, dropout=0.3, batch_norm=True):
    """Per channel count: conv 3x3 (padding 1), max-pool 2, [BatchNorm], ReLU; then per hidden width
    Linear, ReLU, Dropout; then a Linear head and cross-entropy.

    Pooling straight after the convolution lets batch norm and ReLU work on a quarter of
    the entries. (ReLU commutes with max-pooling; batch norm after pooling normalises the
    pooled maps.) Batch norm subtracts each channel's mean, so the convolutions need no bias.
    """
    layers, width, size = [], in_channels, image_size
    for count in channels:
        layers += [Conv2dLayer(width, count, 3, padding=1, bias=not batch_norm), MaxPool2dLayer(2)]
        layers += [BatchNorm2dLayer(count)] if batch_norm else []
        layers.append(ReluLayer())
        width, size = count, size // 2
    layers.append(FlattenLayer())
    return SequentialLayers(layers + dense_head(width * size * size, hidden, classes, dropout))


def dense_head(width, hidden, classes, dropout):
    """[Linear, ReLU, Dropout] per hidden width, then a Linear to the classes and cross-entropy."""
    layers = []
    for size in hidden:
        layers += [LinearLayer(width, size), ReluLayer()]
        layers += [DropoutLayer(dropout)] if dropout else []
        width = size
    return layers + [LinearLayer(width, classes), CrossEntropyLossLayer()]


def transformer_block(width, heads, dropout=0.0, bias=True):
    """Pre-norm GPT-2 block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))."""
    def drop():  # a fresh layer per branch: each keeps the mask its own backward needs
        return [DropoutLayer(dropout)] if dropout else []

    attention = SequentialLayers([LayerNormLayer(width, bias=bias),
                                  MultiHeadAttention(width, heads, bias=bias, dropout=dropout), *drop()])
    mlp = SequentialLayers([LayerNormLayer(width, bias=bias), LinearLayer(width, 4 * width, bias), GeluLayer(),
                            LinearLayer(4 * width, width, bias), *drop()])
    return SequentialLayers([ResidualBlock(attention), ResidualBlock(mlp)])


def gpt(vocab_size, context=64, layers=4, heads=4, width=128, dropout=0.0, tie_weights=False, bias=False):
    """A character-level GPT: token and position embeddings, pre-norm blocks, LayerNorm, linear head.

    Initialised as GPT-2: weights N(0, 0.02), biases 0, and each residual branch's output
    projection N(0, 0.02 / sqrt(2 * layers)). With ``tie_weights`` (GPT-2 and nanoGPT) the
    head uses the token embedding's table (one array, one gradient); the default is a head
    of its own, which ended 2000 steps on Tiny Shakespeare 0.02 lower (six seeds, README).
    ``bias=False`` (nanoGPT's default) leaves the biases out of the linear and LayerNorm layers.
    ``dropout``, if not 0, drops where nanoGPT does: the embeddings' sum, the attention weights, and
    each residual branch's output.
    """
    embedding = EmbeddingLayer(vocab_size, width)
    head = LinearLayer(width, vocab_size, bias=False)
    blocks = [transformer_block(width, heads, dropout, bias) for _ in range(layers)]
    net = SequentialLayers([embedding, PositionalEmbeddingLayer(context, width),
                            *([DropoutLayer(dropout)] if dropout else []), *blocks,
                            LayerNormLayer(width, bias=bias), head, CrossEntropyLossLayer()])
    init_gpt2(net, blocks, layers)
    if tie_weights:
        head.params["w"], head.grads["w"] = embedding.params["weight"], embedding.grads["weight"]
    return net


def init_gpt2(net, blocks, depth):
    for name, param, _ in net.named_parameters():
        if name.endswith(".weight") and param.ndim == 2 or name.endswith(".w"):
            param[...] = backend.normal(0.02, param.shape, param.dtype)
        elif name.endswith(".b"):
            param[...] = 0
    for block in blocks:
        attention, mlp = block.layers[0].body, block.layers[1].body
        for projection in (attention.layers[1].proj, mlp.layers[3]):
            w = projection.params["w"]
            w[...] = backend.normal(0.02 / math.sqrt(2 * depth), w.shape, w.dtype)


def lstm(vocab_size, context=64, width=64, hidden=(256, 256), dropout=0.0):
    """A character-level LSTM: a token embedding, one ``LSTMLayer`` per hidden size, a linear head.

    ``width`` is the embedding's, ``hidden`` lists each LSTM layer's hidden size (the first
    reads the embedding, each next one the previous layer's states), and ``dropout``, if
    not 0, drops each LSTM layer's outputs: between two layers and before the head.
    ``context`` is the length of the windows the model trains on and samples from; no
    weight depends on it. Every window starts from a zero state and back-propagation through
    time covers all of it. Initialised as PyTorch's ``Embedding``, ``LSTM`` and ``Linear``.
    """
    layers, size = [EmbeddingLayer(vocab_size, width)], width
    for hidden_size in hidden:
        layers.append(LSTMLayer(size, hidden_size))
        layers += [DropoutLayer(dropout)] if dropout else []
        size = hidden_size
    return SequentialLayers(layers + [LinearLayer(size, vocab_size), CrossEntropyLossLayer()])


BUILDERS = {"mlp": mlp, "cnn": cnn, "gpt": gpt, "lstm": lstm}
TEXT_MODELS = ("gpt", "lstm")  # read characters, predict the next: trained on text, sampled by ``mnn generate``


def resolve(architecture):
    """The architecture with every setting spelled out, defaults included.

    Checkpoints store this form, so a later change of a builder's defaults cannot change
    the network an old checkpoint rebuilds.
    """
    name, kwargs = architecture.get("name"), architecture.get("kwargs", {})
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(BUILDERS)}")
    signature = inspect.signature(BUILDERS[name])
    unknown = sorted(set(kwargs) - set(signature.parameters))
    if unknown:
        raise ValueError(f"model {name!r} has no setting {', '.join(unknown)}; "
                         f"it takes {', '.join(signature.parameters)}")
    try:
        bound = signature.bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"model {name!r}: {error}") from error
    bound.apply_defaults()
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in bound.arguments.items()}
    from .checkpoint_schema import FieldError, check_model_settings
    try:
        check_model_settings(name, settings)
    except FieldError as error:
        raise ValueError(f"model {name!r}: {error}") from error
    return {"name": name, "kwargs": settings}


def build(architecture):
    """A network from ``{"name": "mlp", "kwargs": {...}}``."""
    architecture = resolve(architecture)
    return BUILDERS[architecture["name"]](**architecture["kwargs"])


def parameter_count(architecture, buffers=False):
    """How many numbers ``build(architecture)`` trains, counted layer by layer without building it.

    With ``buffers``, batch norm's running statistics too: what a checkpoint's ``param/``
    tensors hold. A weight shared by two layers (``tie_weights``) counts once.
    """
    architecture = resolve(architecture)
    counters = {"mlp": mlp_parameter_count, "cnn": cnn_parameter_count, "gpt": gpt_parameter_count,
                "lstm": lstm_parameter_count}
    return counters[architecture["name"]](**architecture["kwargs"], buffers=buffers)


def linear_parameter_count(in_features, out_features, bias=True):
    return out_features * in_features + (out_features if bias else 0)


def dense_head_parameter_count(width, hidden, classes):
    widths = [width, *hidden, classes]
    return sum(linear_parameter_count(a, b) for a, b in zip(widths, widths[1:]))


def mlp_parameter_count(in_features, hidden, classes, dropout, buffers=False):
    return dense_head_parameter_count(in_features, hidden, classes)


def cnn_parameter_count(in_channels, image_size, channels, hidden, classes, dropout, batch_norm, buffers=False):
    count, width, size = 0, in_channels, image_size
    for out in channels:
        count += out * width * 3 * 3 + (0 if batch_norm else out)  # 3x3 kernels; a bias only without batch norm
        count += (2 + (2 if buffers else 0)) * out if batch_norm else 0  # scale, shift; running mean, variance
        width, size = out, size // 2
    return count + dense_head_parameter_count(width * size * size, hidden, classes)


def gpt_parameter_count(vocab_size, context, layers, heads, width, dropout, tie_weights, bias, buffers=False):
    norm = width * (2 if bias else 1)
    attention = linear_parameter_count(width, 3 * width, bias) + linear_parameter_count(width, width, bias)
    mlp = linear_parameter_count(width, 4 * width, bias) + linear_parameter_count(4 * width, width, bias)
    embeddings = vocab_size * width + context * width
    head = 0 if tie_weights else width * vocab_size
    return embeddings + layers * (2 * norm + attention + mlp) + norm + head


def lstm_parameter_count(vocab_size, context, width, hidden, dropout, buffers=False):
    count, size = vocab_size * width, width
    for hidden_size in hidden:  # weight_ih, weight_hh and two biases, four gates each
        count += 4 * hidden_size * (size + hidden_size + 2)
        size = hidden_size
    return count + linear_parameter_count(size, vocab_size)
