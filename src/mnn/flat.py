"""Flat buffers: every parameter and every gradient as a view into one array per dtype.

A network's tensors are many small arrays. Laid end to end in one buffer, they can be
sent in one message (the data-parallel all-reduce: ``mnn.distributed``) and cleared in one
pass, while each layer still reads and writes its own
``params[name]`` and ``grads[name]``: those become views into the buffers, so the layer
contract does not change.

``flatten(net)`` copies the values into the buffers and points every layer at its views.
A parameter shared by two layers (tied weights) gets one place, seen by both.
"""
from . import backend

ALIGN = 16  # each tensor starts at a multiple of 16 entries (64 bytes in float32): a cache line


class FlatBuffers:
    """``params[dtype]`` and ``grads[dtype]``: one 1-D array each, holding every tensor of that dtype."""

    def __init__(self, params, grads):
        self.params, self.grads = params, grads

    def zero_grads(self):
        for grad in self.grads.values():
            grad[...] = 0

    @property
    def size(self):
        """Entries in all the gradient buffers together (padding included)."""
        return sum(grad.size for grad in self.grads.values())


def flatten(net, optimizer=None):
    """Move ``net``'s parameters and gradients into flat buffers, one per dtype; return them.

    Every array is copied into its place, then every layer that held the old array holds
    the view instead (tied weights included). An optimizer keeps references to the arrays
    it updates: one created before this call is passed as ``optimizer``, and each array
    it holds is replaced by its view (its names, and the parameters it leaves alone, kept)."""
    layout = plan(net.named_parameters())
    xp = backend.array_module(next(iter(layout.values()))[0][0]) if layout else backend.xp()
    buffers = {}
    for dtype, placed in layout.items():
        total = placed[-1][1] + placed[-1][0].size if placed else 0
        buffers[dtype] = (xp.zeros(total, dtype=dtype), xp.zeros(total, dtype=dtype))
    moved = {}
    for dtype, placed in layout.items():
        flat_param, flat_grad = buffers[dtype]
        for param, offset, grad in placed:
            views = view(flat_param, offset, param), view(flat_grad, offset, grad)
            views[0][...], views[1][...] = param, grad
            moved[id(param)], moved[id(grad)] = views
    point_layers_at(net, moved)
    retire(param for placed in layout.values() for param, _, _ in placed)
    if optimizer is not None:
        optimizer.parameters = [(name, moved.get(id(param), param), moved.get(id(grad), grad))
                                for name, param, grad in optimizer.parameters]
    return FlatBuffers({dtype: pair[0] for dtype, pair in buffers.items()},
                       {dtype: pair[1] for dtype, pair in buffers.items()})


def retire(arrays):
    """Make the arrays the views replaced read-only (NumPy's; CuPy's have no such flag): an optimizer
    created before ``flatten`` and not passed to it would update them, training nothing, and then
    says so (``Optimizer.step``)."""
    for array in arrays:
        if hasattr(array.flags, "writeable"):
            array.flags.writeable = False


def plan(triples):
    """{dtype: [(parameter, offset, gradient)]}: where each tensor goes, in the order given."""
    layout, ends = {}, {}
    for _, param, grad in triples:
        dtype = param.dtype
        offset = -(-ends.get(dtype, 0) // ALIGN) * ALIGN
        layout.setdefault(dtype, []).append((param, offset, grad))
        ends[dtype] = offset + param.size
    return layout


def view(flat, offset, like):
    return flat[offset:offset + like.size].reshape(like.shape)


def point_layers_at(layer, moved):
    """Replace, in ``layer`` and every layer inside it, each array found in ``moved`` by its view."""
    from .layers.base import CompositeLayer

    if isinstance(layer, CompositeLayer):
        for sub in layer.sublayers().values():
            point_layers_at(sub, moved)
        return
    for name in layer.params:
        layer.params[name] = moved.get(id(layer.params[name]), layer.params[name])
        layer.grads[name] = moved.get(id(layer.grads[name]), layer.grads[name])


def buffers_behind(triples):
    """Where (name, parameter, gradient) triples all lie in flat buffers that ``flatten`` made:
    ``[(flat_param, flat_grad, [(index, offset), ...])]``, one entry per pair of buffers, each triple
    by its index and the offset of its tensors in them. None if any tensor is not such a view, or
    a gradient does not sit at its parameter's offset, or two tensors overlap."""
    groups = {}
    for index, (_, param, grad) in enumerate(triples):
        flat_param, flat_grad = param.base, grad.base
        if flat_param is None or flat_grad is None or not (flat_param.ndim == flat_grad.ndim == 1):
            return None
        if grad.dtype != param.dtype or not (param.flags.c_contiguous and grad.flags.c_contiguous):
            return None
        offset = offset_in(flat_param, param)
        if offset != offset_in(flat_grad, grad) or flat_grad.size != flat_param.size:
            return None
        groups.setdefault((id(flat_param), id(flat_grad)), (flat_param, flat_grad, []))[2].append((index, offset))
    for _, _, members in groups.values():
        spans = sorted((offset, offset + triples[index][1].size) for index, offset in members)
        if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
            return None
    return list(groups.values())


def copy_into_memo(triples, memo):
    """For ``copy.deepcopy``: copy the buffers behind ``triples`` into ``memo``, and map each tensor to its
    view in the copies, so that whatever the deep copy reaches (the layers, an optimizer copied with
    them) holds views into the copied buffers, as the originals do into theirs. False where the tensors
    lie in no such buffers (nothing is then put in ``memo``)."""
    import copy

    groups = buffers_behind(triples)
    if groups is None:
        return False
    for flat_param, flat_grad, members in groups:
        param_copy, grad_copy = copy.deepcopy(flat_param, memo), copy.deepcopy(flat_grad, memo)
        for index, offset in members:
            _, param, grad = triples[index]
            memo[id(param)], memo[id(grad)] = view(param_copy, offset, param), view(grad_copy, offset, grad)
    return True


def offset_in(flat, view):
    """The index in 1-D ``flat`` of ``view``'s first entry (NumPy or CuPy arrays)."""
    start = flat.data.ptr if hasattr(flat.data, "ptr") else flat.ctypes.data
    at = view.data.ptr if hasattr(view.data, "ptr") else view.ctypes.data
    return (at - start) // flat.itemsize
