"""mnn — Manual Neural Networks: every backward pass derived by hand, no autograd."""
__version__ = "0.1.0"  # before the imports: checkpoints record it

from . import backend, gradcheck, optim
from .layers import *  # noqa: F401,F403
from .layers import __all__ as _layer_names
from .predict import load
from .seq_layers import SequentialLayers

__all__ = ["backend", "gradcheck", "optim", "load", "SequentialLayers", *_layer_names]
