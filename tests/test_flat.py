"""Flat parameter and gradient buffers, and synchronised batch norm, in one process."""
import numpy
import pytest

from mnn import backend, flat, models, optim
from mnn.flat import ALIGN
from mnn.layers import BatchNorm2dLayer, BatchNormLayer


def small_gpt(tie_weights=False):
    backend.seed(3)
    return models.gpt(vocab_size=11, context=8, layers=2, heads=2, width=16, tie_weights=tie_weights)


@pytest.mark.parametrize("tie_weights", [False, True])
def test_flatten_keeps_every_value_and_makes_every_tensor_a_view(tie_weights):
    net = small_gpt(tie_weights)
    before = {name: (param.copy(), grad) for name, param, grad in net.named_parameters()}
    flat = net.flatten()
    (params,), (grads,) = flat.params.values(), flat.grads.values()
    for name, param, grad in net.named_parameters():
        numpy.testing.assert_array_equal(param, before[name][0])
        assert param.base is params and grad.base is grads
        offset = (param.__array_interface__["data"][0] - params.__array_interface__["data"][0]) // param.itemsize
        assert offset % ALIGN == 0
    assert sum(param.size for _, param, _ in net.named_parameters()) <= params.size


def test_tied_weights_share_one_place_in_the_buffer():
    net = small_gpt(tie_weights=True)
    net.flatten()
    embedding, head = net[0], net[-2]
    assert head.params["w"] is embedding.params["weight"] and head.grads["w"] is embedding.grads["weight"]


@pytest.mark.parametrize("optimizer_first", [False, True])  # the net's optimizer follows the parameters
def test_a_flattened_network_trains_exactly_as_before(optimizer_first):
    x = numpy.random.default_rng(0).integers(0, 11, (4, 8))
    y = numpy.random.default_rng(1).integers(0, 11, (4, 8))
    finals = []
    for flatten in (False, True):
        net = small_gpt(tie_weights=True)
        if optimizer_first:
            net.optimizer = optim.AdamW(net, lr=1e-2)
        if flatten:
            net.flatten()
        if not optimizer_first:
            net.optimizer = optim.AdamW(net, lr=1e-2)
        for _ in range(3):
            net.zero_grads()
            net(x, y)
            net.backward()
            net.step()
        finals.append({name: param.copy() for name, param in net.state_dict().items()})
    for name in finals[0]:
        numpy.testing.assert_array_equal(finals[0][name], finals[1][name])


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle"])
@pytest.mark.parametrize("optimizer_held", ["by the network", "apart"])
def test_a_copy_of_a_flattened_network_trains_as_the_network(copy_by, optimizer_held):
    """A copy's parameters and gradients came apart from its buffers: zero_grads cleared the buffers alone,
    and the copy's gradients added up step after step. A deep copy is flat as the original (an optimizer
    copied with it holds the same views); pickle keeps no views, so its copy is no longer flat."""
    import copy
    import pickle

    x, y = (numpy.random.default_rng(seed).integers(0, 11, (4, 8)) for seed in (0, 1))

    def three_steps(net, optimizer):
        for _ in range(3):
            net.zero_grads()
            net(x, y)
            net.backward()
            optimizer.step()
        return net.state_dict()

    net = small_gpt(tie_weights=True)
    net.flatten()
    optimizer = optim.AdamW(net, lr=1e-2)
    if optimizer_held == "by the network":
        net.optimizer = optimizer
    three_steps(net, optimizer)
    pair = (net, optimizer)
    clone, clone_optimizer = copy.deepcopy(pair) if copy_by == "deepcopy" else pickle.loads(pickle.dumps(pair))
    ours, theirs = three_steps(net, optimizer), three_steps(clone, clone_optimizer)
    for name in ours:
        numpy.testing.assert_array_equal(ours[name], theirs[name])
    assert (flat.buffers_behind(clone.named_parameters()) is not None) == (copy_by == "deepcopy")
    assert (clone.flat is not None) == (copy_by == "deepcopy")
    shallow = copy.copy(net)  # the same layers: the network's own buffers still behind them
    assert shallow.flat is net.flat and flat.buffers_behind(net.named_parameters()) is not None


def test_zero_grads_clears_the_whole_buffer():
    net = small_gpt()
    flat = net.flatten()
    net(numpy.zeros((2, 8), dtype=int), numpy.ones((2, 8), dtype=int))
    net.backward()
    assert numpy.abs(next(iter(flat.grads.values()))).sum() > 0
    net.zero_grads()
    assert not next(iter(flat.grads.values())).any()


@pytest.mark.parametrize("layer_class, shape", [(BatchNormLayer, (6, 3)), (BatchNorm2dLayer, (3, 3, 4, 5))])
def test_synchronised_batch_norm_equals_batch_norm_of_the_global_batch(layer_class, shape):
    """Two ranks that hold the same rows: sums over the ranks are twice the local sums, and
    the layer must act as batch norm over the batch the two make together."""
    backend.set_default_dtype(numpy.float64)
    try:
        rng = numpy.random.default_rng(0)
        x, g = rng.normal(size=shape), rng.normal(size=shape)
        local, together = layer_class(3), layer_class(3)
        local.batch_total = lambda sums: 2 * sums
        y = local.forward(x)
        y_both = together.forward(numpy.concatenate([x, x]))
        numpy.testing.assert_allclose(y, y_both[:len(x)], rtol=1e-12, atol=1e-12)
        for name in ("running_mean", "running_var"):  # the unbiased variance counts every rank's rows
            numpy.testing.assert_allclose(local.buffers[name], together.buffers[name], rtol=1e-12)
        dx, dx_both = local.backward(g), together.backward(numpy.concatenate([g, g]))
        numpy.testing.assert_allclose(dx, dx_both[:len(x)], rtol=1e-10, atol=1e-12)
        for name in ("weight", "bias"):  # this rank's own sums: averaged over the ranks later
            numpy.testing.assert_allclose(2 * local.grads[name], together.grads[name], rtol=1e-12)
    finally:
        backend.set_default_dtype(numpy.float32)


def test_flatten_keeps_an_optimizers_own_names_and_the_parameters_it_leaves_alone():
    net = small_gpt()
    head = net[-2]
    net.optimizer = optim.SGD([(f"p{i}", *pair) for i, pair in enumerate(zip(head.params.values(),
                                                                               head.grads.values()))], lr=0.1)
    frozen = {name: param.copy() for name, param in net.state_dict().items() if not name.startswith(f"{len(net) - 2}.")}
    net.flatten()
    assert [name for name, _, _ in net.optimizer.parameters] == ["p0"]  # the head: w, no bias
    assert all(param.base is not None for _, param, _ in net.optimizer.parameters)  # views into the buffer
    net(numpy.zeros((2, 8), dtype=int), numpy.ones((2, 8), dtype=int))
    net.backward()
    before = head.params["w"].copy()
    net.step()
    assert not numpy.array_equal(head.params["w"], before)
    for name, param in net.state_dict().items():
        if name in frozen:
            numpy.testing.assert_array_equal(param, frozen[name])


def test_an_optimizer_left_behind_by_flatten_says_so_rather_than_training_nothing():
    net = models.build({"name": "mlp", "kwargs": {"in_features": 4, "hidden": [3], "classes": 2}})
    left_behind = optim.SGD(net, lr=0.1)  # neither net.optimizer nor created after flatten()
    net.flatten()
    net(numpy.ones((2, 4), numpy.float32), numpy.array([0, 1]))
    net.backward()
    with pytest.raises(RuntimeError, match=r"SGD: 1.w is no longer the network's parameter: net.flatten\(\) moved "
                                           r"it into a flat buffer; create the optimizer after flatten\(\)"):
        left_behind.step()
    before = net.params["1.w"].copy()
    optim.SGD(net, lr=0.1).step()  # one made after flatten() trains the buffer's views
    assert not numpy.array_equal(net.params["1.w"], before)


def test_buffers_behind_finds_each_tensors_place_and_refuses_what_is_not_flat():
    """What lets Adam update a whole buffer in one launch on a GPU (optim.FlatMoments)."""
    net = models.mlp(in_features=5, hidden=[7], classes=3, dropout=0)
    loose = net.named_parameters()
    assert flat.buffers_behind(loose) is None  # not views yet
    buffers = net.flatten()
    triples = net.named_parameters()
    (flat_param, flat_grad, members), = flat.buffers_behind(triples)
    assert flat_param is buffers.params[numpy.dtype(numpy.float32)] and flat_grad is buffers.grads[flat_param.dtype]
    for index, offset in members:
        _, param, grad = triples[index]
        assert offset % ALIGN == 0
        numpy.testing.assert_array_equal(flat_param[offset:offset + param.size], param.ravel())
        assert numpy.shares_memory(flat_grad[offset:offset + grad.size], grad)
    (name, param, grad), *rest = triples
    assert flat.buffers_behind([(name, param, grad[::-1])] + rest) is None  # not in order
    assert flat.buffers_behind([(name, param, rest[0][2])] + rest[1:]) is None  # a gradient at another's place
    overlapping = (name + "'", flat_param[1:param.size + 1].reshape(param.shape), flat_grad[1:param.size + 1])
    assert flat.buffers_behind(triples + [overlapping]) is None
