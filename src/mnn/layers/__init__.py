"""mnn's layers: each file holds one family, each class its forward, backward and derivation."""
from .activations import GeluLayer, ReluLayer, SigmoidLayer, TanhLayer
from .base import Layer, LossLayer
from .conv import Conv2dLayer
from .dropout import DropoutLayer
from .linear import LinearLayer, MatrixProduct
from .normalization import BatchNorm2dLayer, BatchNormLayer, LayerNormLayer
from .pooling import AvgPool2dLayer, MaxPool2dLayer
from .losses import CrossEntropyLossLayer, MSELossLayer, NllLossLayer
from .reshape import FlattenLayer
from .softmax import LogSoftmaxLayer, SoftmaxLayer

__all__ = [
    "Layer", "LossLayer", "LinearLayer", "MatrixProduct", "ReluLayer", "SigmoidLayer", "TanhLayer",
    "GeluLayer", "SoftmaxLayer", "LogSoftmaxLayer", "MSELossLayer", "NllLossLayer",
    "CrossEntropyLossLayer", "DropoutLayer", "FlattenLayer", "Conv2dLayer", "MaxPool2dLayer",
    "AvgPool2dLayer", "BatchNormLayer", "BatchNorm2dLayer", "LayerNormLayer",
]
