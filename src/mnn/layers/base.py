"""The layer contract every mnn layer follows.

* ``forward(inputs)`` returns the outputs and keeps what ``backward`` needs.

* ``backward(gradients)`` takes $\\partial L/\\partial y$ and returns
  $\\partial L/\\partial x$; it **adds** each parameter's gradient into
  ``self.grads[name]`` (same shape as ``self.params[name]``).

* ``zero_grads()`` clears the gradients; ``train()``/``eval()`` switch modes.

A loss layer's ``forward(inputs, targets)`` returns the mean loss and its
``backward()`` takes no argument: the loss is where back-propagation starts.

The base class also checks the contract at run time, so no layer repeats it: every
``backward(g)`` is refused unless ``g`` has the shape of the output the last ``forward``
returned (NumPy would otherwise broadcast a wrong gradient silently).
"""
import functools
import numbers

import numpy

from .. import backend
from ..files import counted


class Layer:
    """Base class: parameter and gradient dicts, modes, saved tensors, input checks.

    ``input_grad = False`` lets a layer skip its input gradient (backward returns None):
    a network's first layer needs only its parameter gradients, as PyTorch knows when the
    input does not require a gradient. ``SequentialLayers.input_grad`` sets it.
    """

    input_grad = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in vars(cls):
            cls.forward = records_output_shape(cls.forward)
        if "backward" in vars(cls):
            cls.backward = checks_gradient_shape(cls.backward)

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
        """(name, array) pairs of the state that is not trained (batch norm's running statistics)."""
        return [(prefix + name, value) for name, value in self.buffers.items()]

    def zero_grads(self):
        """Set every gradient to 0 in place: ``backward`` adds to them."""
        for grad in self.grads.values():
            grad[...] = 0

    def load_weights(self, state_dict):
        """Copy arrays into the parameters and buffers in place, after checking every name, shape and
        value: a failure leaves the layer (or network) as it was."""
        targets = self.state_dict()
        missing, unexpected = targets.keys() - state_dict.keys(), state_dict.keys() - targets.keys()
        if missing or unexpected:
            raise ValueError(f"load_weights: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, target in targets.items():
            check_loadable(name, state_dict[name], target)
        for name, target in targets.items():  # one at a time: a GPU holds one tensor more, not a network more
            target[...] = backend.array_module(target).asarray(state_dict[name])

    def state_dict(self):
        """Parameter and buffer arrays by name (the arrays themselves, as in PyTorch)."""
        return {**self.params, **dict(self.named_buffers())}

    # -- modes ------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (dropout drops, batch norm uses the batch's statistics), or with False evaluation."""
        self.training = mode
        return self

    def eval(self):
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    # -- description, for checkpoints that rebuild their own network -----
    def config(self):
        """Constructor arguments, shown by repr (whole models are rebuilt by mnn.models.build)."""
        return {}

    # -- what backward needs ----------------------------------------------
    def save(self, *tensors):
        """Keep what ``backward`` will need; ``saved()`` gives it back."""
        self._saved = tensors

    def saved(self):
        """Tensors kept by forward; a clear error if backward comes first."""
        if self._saved is None:
            raise RuntimeError(f"{self!r}: backward() called before forward() (or a forward that kept nothing "
                               "with self.save)")
        return self._saved

    # -- input checks -----------------------------------------------------
    def check_input(self, x, ndim=None, min_ndim=None, last_dim=None, name="input"):
        """Raise a ValueError naming this layer if ``x`` has the wrong rank, size or dtype."""
        check_array(self, x, name)
        expected = []
        if ndim is not None and x.ndim != ndim:
            expected.append(counted(ndim, "dimension"))
        if min_ndim is not None and x.ndim < min_ndim:
            expected.append(f"at least {counted(min_ndim, 'dimension')}")
        if last_dim is not None and (x.ndim == 0 or x.shape[-1] != last_dim):
            expected.append(f"last dimension {last_dim}")
        if expected:
            raise ValueError(f"{self!r}: {name} of shape {tuple(x.shape)}; expected {', '.join(expected)}")
        check_floating(self, x, name)


class CompositeLayer(Layer):
    """A layer built from sub-layers (attention, a residual block, a whole network).

    Its parameters are its sub-layers' own arrays, named ``<sub-layer>.<parameter>``, so
    optimizers and checkpoints see one flat dict; an array shared by two sub-layers
    (tied weights) is listed once.
    """

    def __init__(self):  # params and grads are derived from the sub-layers, not stored
        self.training, self._saved, self.buffers = True, None, {}

    def sublayers(self):
        """Sub-layers by name, in order."""
        raise NotImplementedError

    def named_parameters(self, prefix=""):
        seen, triples = {}, []
        for name, layer in self.sublayers().items():
            for triple in layer.named_parameters(f"{prefix}{name}."):
                first = seen.setdefault(id(triple[1]), triple)
                if first is triple:
                    triples.append(triple)
                elif first[2] is not triple[2]:  # its gradient would be dropped
                    raise ValueError(f"{type(self).__name__}: {triple[0]} shares its parameter array with {first[0]} "
                                     "but not its gradient array; tie both, as in b.params['w'] = a.params['w']; "
                                     "b.grads['w'] = a.grads['w']")
        return triples

    def named_buffers(self, prefix=""):
        return [item for name, layer in self.sublayers().items() for item in layer.named_buffers(f"{prefix}{name}.")]

    def add_param(self, name, value):
        raise TypeError(f"{type(self).__name__}: a composite layer's parameters are its sub-layers'; give "
                        f"{name!r} to a sub-layer (a layer of its own, with forward and backward)")

    @property
    def params(self):
        return {name: param for name, param, _ in self.named_parameters()}

    @property
    def grads(self):
        return {name: grad for name, _, grad in self.named_parameters()}

    def zero_grads(self):
        for layer in self.sublayers().values():
            layer.zero_grads()

    def train(self, mode=True):
        self.training = mode
        for layer in self.sublayers().values():
            layer.train(mode)
        return self


def check_loadable(name, value, target):
    """A ValueError naming ``name`` unless ``value`` fits ``target``: the same shape, real numbers, finite
    in ``target``'s dtype (a variance, at least 0), as a checkpoint's tensors must be."""
    if not backend.is_array(value):
        raise TypeError(f"load_weights: {name} must be a NumPy or CuPy array, got {type(value).__name__}")
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"load_weights: {name} has shape {tuple(value.shape)}; expected {tuple(target.shape)}")
    if value.dtype.kind not in "fiu":
        raise ValueError(f"load_weights: {name} holds {value.dtype} values; expected real numbers")
    xp, dtype = backend.array_module(value), numpy.dtype(target.dtype)
    largest = float(numpy.finfo(dtype).max if dtype.kind == "f" else numpy.iinfo(dtype).max)
    wide = value.astype(xp.float64, copy=False)  # compared where both ranges fit (float16's ends at 65504)
    if value.size and not bool((xp.abs(wide) <= largest).all()):  # NaN and infinity compare False
        raise ValueError(f"load_weights: {name} holds NaN, infinity or values beyond {target.dtype}'s range")
    if name.endswith("running_var") and value.size and not bool((value >= 0).all()):
        raise ValueError(f"load_weights: {name}, a variance, holds values below 0")


def records_output_shape(forward):
    """Wrap a layer's ``forward`` to remember the shape of what it returned."""
    @functools.wraps(forward)
    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        self._output_shape = getattr(out, "shape", None)
        return out
    return recording


def checks_gradient_shape(backward):
    """Wrap a layer's ``backward`` to refuse a gradient shaped unlike the forward's output.

    Only the outermost call is checked: a subclass whose ``forward`` reshapes what
    ``super().forward`` returns passes ``super().backward`` a gradient of the inner shape."""
    @functools.wraps(backward)
    def checking(self, *args, **kwargs):
        if getattr(self, "_in_backward", False):
            return backward(self, *args, **kwargs)
        if args and args[0] is not None:
            check_gradient(self, args[0])
        self._in_backward = True
        try:
            return backward(self, *args, **kwargs)
        finally:
            self._in_backward = False
    return checking


def check_gradient(layer, g):
    if isinstance(g, bool):
        raise TypeError(f"{describe(layer)}.backward({g}): pass debug by keyword, backward(debug={g})")
    check_array(layer, g, "backward's gradient")
    check_floating(layer, g, "backward's gradient")
    expected = getattr(layer, "_output_shape", None)
    if expected is not None and tuple(g.shape) != tuple(expected):
        raise ValueError(f"{describe(layer)}: backward got a gradient of shape {tuple(g.shape)}; expected the "
                         f"shape of the last forward's output, {tuple(expected)}")


def check_array(layer, x, name="input", dtype="float32"):
    if not backend.is_array(x):
        raise TypeError(f"{describe(layer)}: {name} must be a NumPy or CuPy array, got {type(x).__name__} "
                        f"(convert it with numpy.asarray(x, dtype=numpy.{dtype}))")


def describe(layer):
    """The layer's repr when it fits on one line (a whole network's does not: then its class)."""
    text = repr(layer)
    return text if "\n" not in text else type(layer).__name__


def check_size(owner, name, value, minimum=1):
    """An integer setting (a width, a count) of at least ``minimum``, or a ValueError naming ``owner``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_flag(owner, name, value):
    """A yes/no setting (``bias``, ``causal``) as a bool, or a ValueError naming ``owner``: the string
    'False' is true in Python, so nothing but True, False (or NumPy's) is taken."""
    if not isinstance(value, (bool, numpy.bool_)):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def check_floating(layer, x, name="input"):
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f":
        raise ValueError(f"{describe(layer)}: {name} must be a floating-point array, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")


def check_in_range(layer, values, upper, what, outside=None):
    """Refuse integer ``values`` (labels, token indices) outside [0, ``upper``). ``outside`` is how many a GPU
    kernel counted as it read them (reading it waits for the device); without it they are looked at here."""
    if outside is None:
        outside = values.size and (int(values.min()) < 0 or int(values.max()) >= upper)
    if int(outside):
        raise ValueError(f"{describe(layer)}: {what} must lie in [0, {upper}), got "
                         f"[{int(values.min())}, {int(values.max())}]")


class LossLayer(Layer):
    """A layer that ends the network: ``forward(inputs, targets)`` returns the mean loss."""

    def backward(self):  # noqa: D102 - loss layers start back-propagation
        raise NotImplementedError
