"""mnn — Manual Neural Networks: every backward pass derived by hand, no autograd."""
from . import backend, gradcheck, optim
from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layer_names
from .seq_layers import SequentialLayers

__version__ = "0.1.0"
__all__ = ["backend", "gradcheck", "optim", "SequentialLayers", *_layer_names]
