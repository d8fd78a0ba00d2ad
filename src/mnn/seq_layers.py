r"""``SequentialLayers``: a network as a list of layers, and back-propagation through it."""
import copy

from .layers.base import CompositeLayer, Layer, LossLayer
from .layers.residual import ResidualBlock


class SequentialLayers(CompositeLayer):
    r"""A list of layers applied in order, trained by back-propagation and gradient descent.

    **The chain rule.** If $z(t) = f(x(t), y(t))$, then

    $$\frac{\partial z}{\partial t} = \frac{\partial f}{\partial x}\frac{\partial x}{\partial t}
      + \frac{\partial f}{\partial y}\frac{\partial y}{\partial t}. \tag{1}$$

    For vectors, write $\nabla_t z$ for the gradient (a column) and $J_t x$ for the Jacobian
    $(\partial x_i / \partial t_j)$. Eq. (1) becomes a product of a row and Jacobians:

    $$\nabla_t^\top z = \nabla_x^\top f \cdot J_t x + \nabla_y^\top f \cdot J_t y. \tag{2}$$

    **Back-propagation.** A network is a chain $x_0 \to x_1 = f_1(x_0) \to \dots \to x_k \to L$.
    Applying Eq. (2) once per link, from the loss back,

    $$\nabla_{x_{i-1}}^\top L = \nabla_{x_i}^\top L \cdot J_{x_{i-1}} x_i, \qquad
      \nabla_{\theta_i}^\top L = \nabla_{x_i}^\top L \cdot J_{\theta_i} x_i. \tag{3}$$

    Each layer's ``backward`` computes exactly these two vector-Jacobian products for its
    own $f_i$ and parameters $\theta_i$, never the Jacobian itself; ``backward`` here
    just passes $\nabla_{x_i} L$ from layer to layer, last first.

    **Gradient descent.** With learning rate $\eta$, every parameter moves against its gradient:

    $$t \leftarrow t - \eta\, \nabla_t L. \tag{4}$$

    ``step()`` applies the network's optimizer: Eq. (4) (``mnn.optim.SGD``, $\eta = 0.01$)
    unless another was set with ``net.optimizer = ...``.

    Usage:

    ```python
    net = SequentialLayers([LinearLayer(784, 128), ReluLayer(), LinearLayer(128, 10),
                            CrossEntropyLossLayer()])
    loss = net(images, labels)      # forward, returns the mean loss
    net.zero_grads(); net.backward(); net.step()
    scores = net(images)            # without targets: the output before the loss
    ```

    It is a list of layers too: ``len(net)``, ``net[i]`` and ``for layer in net`` work as on
    a list, and ``get_config()`` describes it as plain data that ``from_config`` rebuilds.

    A ``SequentialLayers`` is itself a layer: without a loss at the end, ``forward(x)`` and
    ``backward(g)`` follow the layer contract, so it can sit inside another network.

    ``net.input_grad = False`` says the gradient w.r.t. the network's input is not wanted
    (training needs only parameter gradients): backward then stops at the first layer with
    parameters, which skips its input gradient, and the list it returns ends there.
    """

    def __init__(self, layers, optimizer=None):
        super().__init__()
        self.layers = list(layers)
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"SequentialLayers: item {index} is {type(layer).__name__}, not a Layer")
            if isinstance(layer, LossLayer) and index != len(self.layers) - 1:
                raise ValueError(f"SequentialLayers: loss layer {layer!r} must be the last layer")
            if not isinstance(layer, LossLayer) and holds_loss(layer):
                raise ValueError(f"SequentialLayers: item {index} ({type(layer).__name__}) holds a loss layer, which "
                                 "a network used as a layer skips: only the outermost network may end in a loss")
        reject_repeated_layers(self)
        self.named_parameters()  # refuses a parameter shared without its gradient
        self.optimizer = optimizer
        self.loss_is_current = False  # did the last forward pass end in the loss?
        self.flat = None  # the flat buffers, once flatten() made them

    def __deepcopy__(self, memo):
        """``copy.deepcopy``: a flattened network's copy is flat too, its tensors views into copies of the
        buffers (``flat.copy_into_memo``), and so are the tensors of an optimizer copied with it
        (``copy.deepcopy((net, optimizer))``). Copied apart, they would be views of nothing: ``zero_grads``
        would clear the buffers alone, and the gradients add up step after step."""
        from .flat import copy_into_memo

        flat = self.flat is not None and copy_into_memo(self.named_parameters(), memo)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, copy.deepcopy(value, memo))
        if not flat:  # buffers that no longer hold the parameters (one was replaced since): not flat
            clone.flat = None
        return clone

    def __setstate__(self, state):
        """pickle keeps no views: a flattened network comes back with its tensors apart from the buffers, so
        it is no longer flat (``zero_grads`` clears each gradient; ``flatten()`` lays them out again)."""
        self.__dict__.update(state)
        self.flat = None

    def __copy__(self):
        """``copy.copy``: the same layers, and so the same buffers (nothing to lay out again)."""
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        return copy

    def __repr__(self):
        inner = "".join(f"\n  ({i}) " + repr(layer).replace("\n", "\n  ") for i, layer in enumerate(self.layers))
        return f"SequentialLayers({inner}\n)"

    # -- a list of layers ---------------------------------------------------
    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def get_config(self):
        """The architecture as plain data (JSON-ready): each layer's class and constructor
        arguments, in order. ``SequentialLayers.from_config`` builds a network of that shape
        (with freshly initialised weights; ``state_dict``/``load_weights`` carry the weights).
        Parameters shared between two layers (a tied head) are not part of the description."""
        return {"layers": [layer_config(layer) for layer in self.layers]}

    @classmethod
    def from_config(cls, config, custom_layers=None):
        """A network built from ``get_config()``'s description.

        Only mnn's own layer classes are looked up by name, plus those in ``custom_layers``
        (``{"PReluLayer": PReluLayer}``): a description never names code to run."""
        return layer_from_config({"type": "SequentialLayers", **config}, custom_layers or {})

    @property
    def loss_layer(self):
        last = self.layers[-1] if self.layers else None
        return last if isinstance(last, LossLayer) else None

    @property
    def body(self):
        """The layers before the loss."""
        return self.layers[:-1] if self.loss_layer else self.layers

    # -- forward ------------------------------------------------------------
    def __call__(self, inputs, targets=None, debug=False):
        """The mean loss when the last layer is a loss and targets are given, else the output."""
        if targets is not None and self.loss_layer is None:
            raise ValueError("SequentialLayers: targets given, but the network ends in no loss layer; "
                             "call net(inputs) for its output, or append a loss layer")
        x = self.forward(inputs, debug=debug)
        if targets is None:
            return x
        loss = self.loss_layer.forward(x, targets)
        self.loss_is_current = True
        if debug:
            print(f"{type(self.loss_layer).__name__}: {tuple(x.shape)} -> loss {float(loss):.6g}")
        return loss

    def forward(self, inputs, debug=False):
        """The output of the last layer before the loss, each layer applied in order (``debug``: print each
        one's shapes)."""
        self.loss_is_current = False
        x = inputs
        for layer in self.body:
            y = layer.forward(x)
            if debug:
                print(f"{type(layer).__name__}: {tuple(x.shape)} -> {tuple(y.shape)}")
            x = y
        return x

    # -- backward -----------------------------------------------------------
    def backward(self, gradients=None, debug=False):
        """Back-propagate, last layer first.

        ``net.backward()`` starts at the loss layer and returns the list of gradients
        passed between layers, last layer first (the loss's own gradient first, the
        gradient w.r.t. the network's input last). Given an upstream gradient, as when
        this network is a layer inside another, it returns the input gradient.
        """
        start = gradients is None
        if start:
            if self.loss_layer is None:
                raise RuntimeError("SequentialLayers.backward() without a gradient needs a loss layer last")
            if not self.loss_is_current:
                raise RuntimeError("SequentialLayers.backward(): no loss to back-propagate (no forward pass yet, "
                                   "or the last one had no targets); call net(inputs, targets) first")
            gradients = self.loss_layer.backward()
            if debug:
                print(f"{type(self.loss_layer).__name__}: grad {tuple(gradients.shape)}")
        passed = [gradients]
        for layer in reversed(self.body[self.first_needed:]):
            gradients = layer.backward(gradients)
            if debug:
                shapes = {name: tuple(g.shape) for name, g in layer.grads.items()}
                given = "no input gradient" if gradients is None else f"grad {tuple(gradients.shape)}"
                print(f"{type(layer).__name__}: {given} params {shapes}")
            if gradients is None:  # the first trained layer, its input gradient not wanted
                break
            passed.append(gradients)
        return passed if start else gradients

    @property
    def input_grad(self):
        return self.body[0].input_grad if self.body else True

    @input_grad.setter
    def input_grad(self, wanted):
        for index, layer in enumerate(self.body):
            layer.input_grad = wanted or index > self.first_trained

    @property
    def first_trained(self):
        """Index of the first layer with parameters (0 if none)."""
        return next((i for i, layer in enumerate(self.body) if layer.named_parameters()), 0)

    @property
    def first_needed(self):
        """Where backward stops: 0, or the first trained layer when the input gradient is not wanted."""
        return 0 if self.input_grad else self.first_trained

    # -- parameters ---------------------------------------------------------
    def sublayers(self):
        return {str(index): layer for index, layer in enumerate(self.layers)}

    def flatten(self):
        """Make every parameter and gradient a view into one flat buffer per dtype (``mnn.flat``),
        so that ``zero_grads`` is one pass and data-parallel training sends the gradients in one
        message. Returns the ``FlatBuffers``. The network's optimizer (``self.optimizer``) follows the
        parameters into the buffers; an optimizer kept elsewhere must be created after this call (one
        created before refuses to step: the arrays it holds are made read-only)."""
        from .flat import flatten

        self.flat = flatten(self, self.optimizer)
        return self.flat

    def zero_grads(self):
        if self.flat is None:
            return super().zero_grads()
        self.flat.zero_grads()

    # -- optimisation -------------------------------------------------------
    def step(self):
        """One optimizer step on every parameter (Eq. (4) unless another optimizer was set)."""
        if self.optimizer is None:
            from .optim import SGD
            self.optimizer = SGD(self.named_parameters(), lr=0.01)
        self.optimizer.step()


def reject_repeated_layers(net):
    """Refuse a network that holds one layer object at two places.

    A layer keeps what its backward needs from its last forward, so a layer used twice
    would back-propagate the second use's tensors through the first. Tied weights are
    shared parameter arrays in two layers, never one layer twice.
    """
    seen = {}
    for path, layer in walk(net):
        if id(layer) in seen:
            raise ValueError(f"SequentialLayers: the same {type(layer).__name__} object sits at {seen[id(layer)]} "
                             f"and at {path}; give each place its own layer (to tie weights, share a parameter "
                             "and its gradient array between two layers instead)")
        seen[id(layer)] = path


def walk(layer, path="net"):
    """(path, layer) for ``layer`` and every layer inside it, depth first."""
    yield path, layer
    if isinstance(layer, CompositeLayer):
        for name, sub in layer.sublayers().items():
            yield from walk(sub, f"{path}.{name}")


def layer_config(layer):
    """One layer as ``{"type": class name, ...}``: constructor arguments, or the layers inside."""
    if isinstance(layer, SequentialLayers):
        return {"type": "SequentialLayers", **layer.get_config()}
    if isinstance(layer, ResidualBlock):
        return {"type": "ResidualBlock", "body": layer_config(layer.body)}
    return {"type": type(layer).__name__, "config": layer.config()}


def holds_loss(layer):
    """Whether a loss layer is ``layer`` or anywhere inside it."""
    inner = layer.sublayers().values() if isinstance(layer, CompositeLayer) else ()
    return isinstance(layer, LossLayer) or any(holds_loss(part) for part in inner)


BASE_CLASSES = ("Layer", "LossLayer", "CompositeLayer")  # no layer of their own: a description names none


def layer_from_config(config, custom_layers):
    from . import layers

    kind = config.get("type") if isinstance(config, dict) else None
    part = {"SequentialLayers": "layers", "ResidualBlock": "body"}.get(kind)
    if part and part not in config:
        raise ValueError(f"SequentialLayers.from_config: a {kind} without its {part!r}")
    if kind == "SequentialLayers":
        return SequentialLayers([layer_from_config(item, custom_layers) for item in config["layers"]])
    if kind == "ResidualBlock":
        return ResidualBlock(layer_from_config(config["body"], custom_layers))
    known = {name: getattr(layers, name) for name in layers.__all__ if name not in BASE_CLASSES} | custom_layers
    if kind not in known:
        raise ValueError(f"SequentialLayers.from_config: unknown layer type {kind!r}; mnn's layers and "
                         "custom_layers={name: class} are accepted")
    try:
        return known[kind](**config.get("config", {}))
    except TypeError as error:  # a setting missing or unknown
        raise ValueError(f"SequentialLayers.from_config: {kind}: {error}") from error
