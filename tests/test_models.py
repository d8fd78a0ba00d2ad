"""Whole models: mnn's loss and every parameter's gradient equal a PyTorch model's with identical weights."""
import torch
from reference import max_relative_difference

from mnn import models


def torch_cnn(net):
    """The same CNN in torch, weights copied from ``net`` (batch norm in training mode)."""
    conv1, bn1, conv2, bn2, linear1, linear2 = [net.layers[i] for i in (0, 2, 4, 6, 9, 11)]
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    pairs = [(conv1, model[0], {"w": "weight"}), (bn1, model[2], {"weight": "weight", "bias": "bias"}),
             (conv2, model[4], {"w": "weight"}), (bn2, model[6], {"weight": "weight", "bias": "bias"}),
             (linear1, model[9], {"w": "weight", "b": "bias"}), (linear2, model[11], {"w": "weight", "b": "bias"})]
    with torch.no_grad():
        for ours, theirs, names in pairs:
            for our_name, their_name in names.items():
                getattr(theirs, their_name).copy_(torch.tensor(ours.params[our_name]))
    return model, pairs


def test_cnn_gradients_equal_torch(float64, rng, kernel_mode):
    net = models.cnn(channels=(4, 6), hidden=[16], dropout=0.0)
    model, pairs = torch_cnn(net)
    x, labels = rng.standard_normal((5, 1, 28, 28)), rng.integers(0, 10, 5)
    loss = net(x, labels)
    input_grad = net.backward()[-1]
    t_x = torch.tensor(x, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(model(t_x), torch.tensor(labels))
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-10
    assert max_relative_difference(input_grad, t_x.grad.numpy()) <= 1e-6
    for ours, theirs, names in pairs:
        for our_name, their_name in names.items():
            assert max_relative_difference(ours.grads[our_name], getattr(theirs, their_name).grad.numpy()) <= 1e-6
    for ours, theirs in [(pairs[1][0], model[2]), (pairs[3][0], model[6])]:
        assert max_relative_difference(ours.buffers["running_var"], theirs.running_var.numpy()) <= 1e-10
