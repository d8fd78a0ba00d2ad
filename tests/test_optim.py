"""Each optimizer equals its torch.optim counterpart over several steps."""
import numpy
import pytest
import torch
from reference import max_relative_difference

from mnn import optim

CASES = {
    "sgd": (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd-momentum-decay": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
                           lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (lambda p: optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.02),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.02)),
    "sgd-dampening": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3),
                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3)),
    "adam": (lambda p: optim.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam-decay": (lambda p: optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
                   lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    "adamw": (lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.1),
              lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", CASES)
def test_optimizer_equals_torch(name, rng):
    ours_factory, torch_factory = CASES[name]
    values = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    params = {k: v.copy() for k, v in values.items()}
    grads = {k: numpy.zeros_like(v) for k, v in values.items()}
    ours = ours_factory([(k, params[k], grads[k]) for k in params])
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    theirs = torch_factory(list(tensors.values()))
    for step in range(6):
        for k in params:
            g = rng.standard_normal(values[k].shape)
            grads[k][...] = g
            tensors[k].grad = torch.tensor(g)
        if step == 3:  # a schedule changing the rate mid-run
            ours.lr *= 0.5
            for group in theirs.param_groups:
                group["lr"] *= 0.5
        ours.step()
        theirs.step()
    for k in params:
        assert max_relative_difference(params[k], tensors[k].detach().numpy()) <= 1e-12


def test_clip_grad_norm_equals_torch(rng):
    grads = [rng.standard_normal((3, 3)) * 10, rng.standard_normal(4)]
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    norm = optim.clip_grad_norm([("x", None, grads[0]), ("y", None, grads[1])], 1.5)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, 1.5)
    assert abs(norm - torch_norm.item()) < 1e-10
    for g, t in zip(grads, tensors):
        assert max_relative_difference(g, t.grad.numpy()) <= 1e-12


def test_cosine_schedule_warms_up_then_decays():
    schedule = optim.CosineSchedule(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55) and schedule(110) == pytest.approx(0.1)
    assert optim.StepSchedule(1.0, 10, 0.5)(25) == 0.25


def test_optimizer_state_round_trip(rng):
    params = {"w": rng.standard_normal(3)}
    grads = {"w": rng.standard_normal(3)}
    first = optim.Adam([("w", params["w"], grads["w"])], lr=0.1)
    first.step()
    copy = {"w": params["w"].copy()}
    second = optim.Adam([("w", copy["w"], grads["w"])], lr=0.5)
    second.load_state_dict(first.state_dict())
    first.step()
    second.step()
    assert second.lr == 0.1 and numpy.array_equal(copy["w"], params["w"])


def test_bad_learning_rate():
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD([], lr=0)


def test_weight_decay_can_skip_vectors_as_torch_param_groups(rng):
    values = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    params = {k: v.copy() for k, v in values.items()}
    grads = {k: rng.standard_normal(v.shape) for k, v in values.items()}
    ours = optim.AdamW([(k, params[k], grads[k]) for k in params], lr=0.1, weight_decay=0.5, decay_vectors=False)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}
    theirs = torch.optim.AdamW([{"params": [tensors["w"]], "weight_decay": 0.5},
                                {"params": [tensors["b"]], "weight_decay": 0.0}], lr=0.1)
    for k in tensors:
        tensors[k].grad = torch.tensor(grads[k])
    for _ in range(3):
        ours.step()
        theirs.step()
    for k in params:
        assert max_relative_difference(params[k], tensors[k].detach().numpy()) <= 1e-12
