"""The layer contract every mnn layer follows.

* ``forward(inputs)`` returns the outputs and keeps what ``backward`` needs.
* ``backward(gradients)`` takes $\\partial L/\\partial y$ and returns
  $\\partial L/\\partial x$; it **adds** each parameter's gradient into
  ``self.grads[name]`` (same shape as ``self.params[name]``).
* ``zero_grads()`` clears the gradients; ``train()``/``eval()`` switch modes.

A loss layer's ``forward(inputs, targets)`` returns the mean loss and its
``backward()`` takes no argument: the loss is where back-propagation starts.
"""
from .. import backend


class Layer:
    """Base class: parameter and gradient dicts, modes, saved tensors, input checks.

    ``input_grad = False`` lets a layer skip its input gradient (backward returns None):
    a network's first layer needs only its parameter gradients, as PyTorch knows when the
    input does not require a gradient. ``SequentialLayers.input_grad`` sets it.
    """

    input_grad = True

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.buffers = {}  # state that is not trained (batch norm's running statistics)
        self.training = True
        self._saved = None

    def __call__(self, *inputs):
        return self.forward(*inputs)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    # -- parameters -------------------------------------------------------
    def add_param(self, name, value):
        """Register a parameter and a zero gradient of the same shape."""
        self.params[name] = value
        self.grads[name] = backend.array_module(value).zeros_like(value)

    def named_parameters(self, prefix=""):
        """(name, parameter, gradient) triples, sub-layers included."""
        return [(prefix + name, self.params[name], self.grads[name]) for name in self.params]

    def named_buffers(self, prefix=""):
        return [(prefix + name, value) for name, value in self.buffers.items()]

    def zero_grads(self):
        for grad in self.grads.values():
            grad[...] = 0

    # -- modes ------------------------------------------------------------
    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    # -- description, for checkpoints that rebuild their own network -----
    def config(self):
        """Constructor arguments that rebuild this layer (see mnn.models.build_layer)."""
        return {}

    # -- what backward needs ----------------------------------------------
    def save(self, *tensors):
        self._saved = tensors

    def saved(self):
        """Tensors kept by forward; a clear error if backward comes first."""
        if self._saved is None:
            raise RuntimeError(f"{self!r}: backward() called before forward()")
        return self._saved

    # -- input checks -----------------------------------------------------
    def check_input(self, x, ndim=None, min_ndim=None, last_dim=None, name="input"):
        """Raise a ValueError naming this layer if ``x`` has the wrong rank, size or dtype."""
        expected = []
        if ndim is not None and x.ndim != ndim:
            expected.append(f"{ndim} dimensions")
        if min_ndim is not None and x.ndim < min_ndim:
            expected.append(f"at least {min_ndim} dimensions")
        if last_dim is not None and (x.ndim == 0 or x.shape[-1] != last_dim):
            expected.append(f"last dimension {last_dim}")
        if expected:
            raise ValueError(f"{self!r}: {name} of shape {tuple(x.shape)}; expected {', '.join(expected)}")
        check_floating(self, x, name)


def check_floating(layer, x, name="input"):
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
        raise ValueError(f"{layer!r}: {name} must be a floating-point array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")


class LossLayer(Layer):
    """A layer that ends the network: ``forward(inputs, targets)`` returns the mean loss."""

    def backward(self):  # noqa: D102 - loss layers start back-propagation
        raise NotImplementedError
