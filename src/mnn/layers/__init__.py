"""mnn's layers: each file holds one family, each class its forward, backward and derivation."""
from .activations import GeluLayer, ReluLayer, SigmoidLayer, TanhLayer
from .attention import MultiHeadAttention
from .base import CompositeLayer, Layer, LossLayer
from .conv import Conv2dLayer
from .dropout import DropoutLayer
from .embedding import EmbeddingLayer, PositionalEmbeddingLayer
from .linear import LinearLayer, MatrixProduct
from .losses import CrossEntropyLossLayer, MSELossLayer, NllLossLayer
from .normalization import BatchNorm2dLayer, BatchNormLayer, LayerNormLayer
from .pooling import AvgPool2dLayer, MaxPool2dLayer
from .recurrent import GRULayer, LSTMLayer, RNNLayer
from .reshape import FlattenLayer
from .residual import ResidualBlock
from .softmax import LogSoftmaxLayer, SoftmaxLayer

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "MatrixProduct", "ReluLayer", "SigmoidLayer", "TanhLayer",
    "GeluLayer", "SoftmaxLayer", "LogSoftmaxLayer", "MSELossLayer", "NllLossLayer",
    "CrossEntropyLossLayer", "DropoutLayer", "FlattenLayer", "Conv2dLayer", "MaxPool2dLayer",
    "AvgPool2dLayer", "BatchNormLayer", "BatchNorm2dLayer", "LayerNormLayer", "CompositeLayer", "EmbeddingLayer",
    "PositionalEmbeddingLayer", "MultiHeadAttention", "ResidualBlock", "RNNLayer", "LSTMLayer", "GRULayer",
]
