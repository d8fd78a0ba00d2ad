"""Each optimizer equals its torch.optim counterpart over several steps; bad settings and states are refused."""
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
    norm = optim.clip_grad_norm([(name, numpy.zeros_like(g), g) for name, g in zip("xy", grads)], 1.5)
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
    with pytest.raises(ValueError, match="SGD: lr must be a finite number > 0, got 0"):
        optim.SGD([], lr=0)


NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = {  # (what is built, the message expected)
    "adamw-lr-nan": (lambda: optim.AdamW([], lr=NAN), "AdamW: lr must be a finite number > 0, got nan"),
    "sgd-lr-inf": (lambda: optim.SGD([], lr=INF), "SGD: lr must be a finite number > 0, got inf"),
    "adam-lr-negative": (lambda: optim.Adam([], lr=-1e-3), "Adam: lr must be a finite number > 0"),
    "adam-lr-text": (lambda: optim.Adam([], lr="0.1"), "Adam: lr must be a finite number > 0, got '0.1'"),
    "adam-lr-bool": (lambda: optim.Adam([], lr=True), "Adam: lr must be"),
    "adam-beta1-one": (lambda: optim.Adam([], betas=(1.0, 0.999)), r"Adam: beta1 must be a number in \[0, 1\)"),
    "adam-beta2-one": (lambda: optim.Adam([], betas=(0.9, 1.0)), "Adam: beta2 must be"),
    "adamw-beta1-negative": (lambda: optim.AdamW([], betas=(-0.1, 0.9)), "AdamW: beta1 must be"),
    "adam-beta-nan": (lambda: optim.Adam([], betas=(NAN, 0.9)), "Adam: beta1 must be"),
    "adam-betas-not-a-pair": (lambda: optim.Adam([], betas=(0.9,)), "Adam: betas must be a pair"),
    "adam-betas-a-number": (lambda: optim.Adam([], betas=0.9), "Adam: betas must be a pair"),
    "adam-eps-zero": (lambda: optim.Adam([], eps=0), "Adam: eps must be a finite number > 0"),
    "adam-eps-negative": (lambda: optim.Adam([], eps=-1e-8), "Adam: eps must be"),
    "adam-decay-negative": (lambda: optim.Adam([], weight_decay=-0.1),
                            "Adam: weight_decay must be a finite number >= 0"),
    "adamw-decay-inf": (lambda: optim.AdamW([], weight_decay=INF), "AdamW: weight_decay must be"),
    "sgd-momentum-negative": (lambda: optim.SGD([], momentum=-0.5), r"SGD: momentum must be a number in \[0, 1\)"),
    "sgd-momentum-one": (lambda: optim.SGD([], momentum=1.0), "SGD: momentum must be"),
    "sgd-dampening-two": (lambda: optim.SGD([], momentum=0.9, dampening=2.0), "SGD: dampening must be"),
    "sgd-decay-nan": (lambda: optim.SGD([], weight_decay=NAN), "SGD: weight_decay must be"),
    "sgd-nesterov-no-momentum": (lambda: optim.SGD([], nesterov=True), "SGD: Nesterov momentum needs"),
    "sgd-nesterov-not-a-flag": (lambda: optim.SGD([], momentum=0.9, nesterov="yes"), "SGD: nesterov must be True"),
    "adam-decay-vectors-not-a-flag": (lambda: optim.Adam([], decay_vectors=0), "Adam: decay_vectors must be True"),
    "cosine-total-zero": (lambda: optim.CosineSchedule(1.0, 0), "CosineSchedule: total_steps must be an integer > 0"),
    "cosine-total-fraction": (lambda: optim.CosineSchedule(1.0, 10.5), "CosineSchedule: total_steps must be"),
    "cosine-warmup-negative": (lambda: optim.CosineSchedule(1.0, 10, -1), "CosineSchedule: warmup_steps must be"),
    "cosine-warmup-too-long": (lambda: optim.CosineSchedule(1.0, 10, 10), "must exceed warmup_steps"),
    "cosine-min-lr-above-base": (lambda: optim.CosineSchedule(1e-3, 10, 0, 1e-2), "CosineSchedule: min_lr must be"),
    "cosine-min-lr-negative": (lambda: optim.CosineSchedule(1.0, 10, 0, -0.1), "CosineSchedule: min_lr must be"),
    "cosine-base-lr-nan": (lambda: optim.CosineSchedule(NAN, 10), "CosineSchedule: base_lr must be"),
    "step-size-zero": (lambda: optim.StepSchedule(1.0, 0), "StepSchedule: step_size must be an integer > 0"),
    "step-gamma-zero": (lambda: optim.StepSchedule(1.0, 10, 0.0), "StepSchedule: gamma must be a finite number > 0"),
    "step-gamma-nan": (lambda: optim.StepSchedule(1.0, 10, NAN), "StepSchedule: gamma must be"),
    "step-base-lr-zero": (lambda: optim.StepSchedule(0.0, 10), "StepSchedule: base_lr must be"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_class_and_argument(name):
    build, message = BAD_ARGUMENTS[name]
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("max_norm", [-1.0, 0.0, float("nan"), float("inf"), "1"])
def test_clip_grad_norm_refuses_a_bad_max_norm_and_leaves_gradients_alone(max_norm, rng):
    grads = rng.standard_normal((3, 3))
    before = grads.copy()
    with pytest.raises(ValueError, match="clip_grad_norm: max_norm must be a finite number > 0"):
        optim.clip_grad_norm([("x", None, grads)], max_norm)
    assert numpy.array_equal(grads, before)


def stepped(factory, rng, steps=2, dtype=numpy.float64):
    """An optimizer from ``factory`` over two parameters, after ``steps`` steps."""
    params = {"w": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(4).astype(dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    optimizer = factory([(k, params[k], grads[k]) for k in params])
    for _ in range(steps):
        optimizer.step()
    return optimizer


def fresh(factory, rng, dtype=numpy.float64):
    return stepped(factory, rng, steps=0, dtype=dtype)


def with_settings(state, **changes):
    return {"settings": {**state["settings"], **changes}, "buffers": state["buffers"]}


def with_buffers(state, buffers):
    return {"settings": state["settings"], "buffers": buffers}


ADAM = lambda p: optim.Adam(p, lr=0.1)  # noqa: E731
BAD_STATES = {  # (a change to a saved Adam state, the message expected)
    "setting-injected": (lambda s: with_settings(s, parameters=[]), "Adam: unknown setting parameters"),
    "method-injected": (lambda s: with_settings(s, update=0), "Adam: unknown setting update"),
    "setting-missing": (lambda s: {"settings": {k: v for k, v in s["settings"].items() if k != "eps"},
                                   "buffers": s["buffers"]}, "Adam: setting eps missing"),
    "lr-nan": (lambda s: with_settings(s, lr=float("nan")), "Adam: lr must be a finite number >= 0, got nan"),
    "lr-text": (lambda s: with_settings(s, lr="abc"), "Adam: lr must be"),
    "beta2-one": (lambda s: with_settings(s, beta2=1.0), "Adam: beta2 must be"),
    "eps-zero": (lambda s: with_settings(s, eps=0.0), "Adam: eps must be"),
    "steps-negative": (lambda s: with_settings(s, steps=-1), "Adam: steps must be an integer >= 0"),
    "steps-fraction": (lambda s: with_settings(s, steps=1.5), "Adam: steps must be"),
    "steps-bool": (lambda s: with_settings(s, steps=True), "Adam: steps must be"),
    "buffers-missing": (lambda s: with_buffers(s, {}), "Adam: buffer b.m, b.v, w.m and 1 more missing after 2 steps"),
    "one-buffer-missing": (lambda s: with_buffers(s, {k: v for k, v in s["buffers"].items() if k != "w.v"}),
                           "Adam: buffer w.v missing"),
    "buffers-before-any-step": (lambda s: with_settings(s, steps=0), "Adam: unexpected buffer b.m"),
    "buffer-of-no-parameter": (lambda s: with_buffers(s, {**s["buffers"], "z.m": numpy.zeros(3)}),
                               "Adam: unexpected buffer z.m"),
    "buffer-wrong-shape": (lambda s: with_buffers(s, {**s["buffers"], "w.m": numpy.zeros((4, 3))}),
                           r"Adam: buffer w.m has shape \(4, 3\); its parameter has \(3, 4\)"),
    "buffer-integers": (lambda s: with_buffers(s, {**s["buffers"], "w.m": numpy.zeros((3, 4), numpy.int32)}),
                        "Adam: buffer w.m must hold finite floating-point numbers"),
    "buffer-nan": (lambda s: with_buffers(s, {**s["buffers"], "b.m": numpy.full(4, numpy.nan)}),
                   "Adam: buffer b.m must hold finite"),
    "second-moment-negative": (lambda s: with_buffers(s, {**s["buffers"], "b.v": -numpy.ones(4)}),
                               "Adam: buffer b.v, a mean of squares, holds negative values"),
}


@pytest.mark.parametrize("name", BAD_STATES)
def test_a_bad_state_is_refused_and_changes_nothing(name, rng):
    change, message = BAD_STATES[name]
    state = stepped(ADAM, rng).state_dict()
    target = fresh(lambda p: optim.Adam(p, lr=0.5), rng)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(change(state))
    assert target.lr == 0.5 and target.steps == 0 and target.buffers == {}


def test_a_buffer_beyond_the_parameters_dtype_is_refused_and_changes_nothing(rng):
    """Checked as it would load: 1e300 is finite in a float64 file and infinite in a float32 network."""
    state = stepped(ADAM, rng).state_dict()
    target = fresh(lambda p: optim.Adam(p, lr=0.5), rng, dtype=numpy.float32)
    with pytest.raises(ValueError, match="Adam: buffer b.v must hold finite floating-point numbers within float32's"):
        target.load_state_dict(with_buffers(with_settings(state, lr=0.1), {**state["buffers"],
                                                                           "b.v": numpy.full(4, 1e300)}))
    assert target.lr == 0.5 and target.steps == 0 and target.buffers == {}


def test_sgd_momentum_buffers_must_all_be_there(rng):
    state = stepped(lambda p: optim.SGD(p, momentum=0.9), rng).state_dict()
    target = fresh(lambda p: optim.SGD(p, momentum=0.9), rng)
    with pytest.raises(ValueError, match="SGD: buffer w.momentum missing after 2 steps"):
        target.load_state_dict(with_buffers(state, {"b.momentum": state["buffers"]["b.momentum"]}))
    with pytest.raises(ValueError, match="SGD: Nesterov momentum needs"):
        target.load_state_dict(with_settings(state, nesterov=True, dampening=0.5))
    target.load_state_dict(state)
    assert set(target.buffers) == {"w.momentum", "b.momentum"}


def test_plain_sgd_has_no_buffers_to_load(rng):
    state = stepped(lambda p: optim.SGD(p, lr=0.1), rng).state_dict()
    assert state["buffers"] == {}
    target = fresh(lambda p: optim.SGD(p, lr=0.1), rng)
    target.load_state_dict(state)
    assert target.steps == 2


def test_loaded_buffers_take_the_parameters_dtype_and_are_copies(rng):
    """A float16 state loaded into a float32 optimizer gives float32 moments (not float16 ones); loaded into a
    float16 one, copies (a step of the optimizer must not move the state it was given)."""
    saved = stepped(ADAM, rng, dtype=numpy.float16)
    state = saved.state_dict()
    assert state["buffers"]["w.m"].dtype == numpy.float16
    target = fresh(ADAM, rng, dtype=numpy.float32)
    target.load_state_dict(state)
    assert all(buffer.dtype == numpy.float32 for buffer in target.buffers.values())
    same_dtype = fresh(ADAM, rng, dtype=numpy.float16)
    same_dtype.load_state_dict(state)
    assert not any(numpy.shares_memory(same_dtype.buffers[name], state["buffers"][name]) for name in state["buffers"])
    same_dtype.step()  # moves its moments, not the state's
    assert all(numpy.array_equal(saved.buffers[name], state["buffers"][name]) for name in state["buffers"])


def test_state_dict_settings_are_json_numbers(rng):
    optimizer = stepped(ADAM, rng)
    optimizer.lr = numpy.float32(0.25)  # as a user's schedule might set it
    settings = optimizer.state_dict()["settings"]
    assert type(settings["lr"]) is float and type(settings["steps"]) is int and type(settings["decay_vectors"]) is bool
    assert set(settings) == set(optim.Adam.rules)


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


@pytest.mark.parametrize("parameters", ["arrays", "dict", "number"])
def test_parameters_that_are_not_named_triples_are_refused(parameters):
    import mnn
    net = mnn.SequentialLayers([mnn.LinearLayer(4, 3), mnn.MSELossLayer()])
    given = {"arrays": list(net.params.values()), "dict": net.params, "number": 5}[parameters]
    before = net.params["0.w"].copy()
    with pytest.raises(TypeError, match=r"SGD: pass a network, or its named_parameters\(\)"):
        optim.SGD(given, lr=0.5).step()  # a bare list of arrays was unpacked row by row, and trained nonsense
    assert (net.params["0.w"] == before).all()


def test_betas_may_be_an_array_of_two():
    import mnn
    net = mnn.SequentialLayers([mnn.LinearLayer(2, 2)])
    adam = optim.AdamW(net, betas=numpy.array([0.8, 0.95], dtype=numpy.float32))
    assert type(adam.beta1) is float and (adam.beta1, adam.beta2) == (float(numpy.float32(0.8)), 0.949999988079071)
    for betas in (numpy.array([0.8, 0.9, 0.95]), numpy.array(0.9), {0.8, 0.9}, "ab"):
        with pytest.raises(ValueError, match="betas must be a pair"):
            optim.AdamW(net, betas=betas)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_numpy_float32_settings_step_as_python_floats_and_as_after_a_reload(name, rng):
    """A NumPy float32 beta or momentum would round 1 - beta and beta ** t to float32 at every step;
    a saved state comes back as Python floats, so a resumed run would step differently."""
    f32 = numpy.float32
    factories = {
        "sgd": lambda kind: lambda p: optim.SGD(p, lr=kind(0.1), momentum=kind(0.9), dampening=kind(0.3)),
        "adam": lambda kind: lambda p: optim.AdamW(p, lr=kind(0.1), betas=(kind(0.9), kind(0.99)), eps=kind(1e-8),
                                                   weight_decay=kind(0.01))}
    with_float32, with_python = (stepped(factories[name](kind), numpy.random.default_rng(1), steps=3)
                                 for kind in (f32, lambda value: float(f32(value))))
    assert all(type(value) in (bool, int, float) for value in with_float32.settings().values())
    for (_, ours, _), (_, theirs, _) in zip(with_float32.parameters, with_python.parameters):
        numpy.testing.assert_array_equal(ours, theirs)
    resumed = fresh(factories[name](f32), numpy.random.default_rng(1))
    resumed.load_state_dict(with_float32.state_dict())
    assert resumed.settings() == with_float32.settings()


def test_a_numpy_scalar_is_no_parameter():
    with pytest.raises(TypeError, match="s: a NumPy scalar, which cannot change in place"):
        optim.SGD([("s", numpy.float64(1.0), numpy.float64(0.5))], lr=0.1)


def test_a_triple_that_does_not_fit_is_told_what_is_wrong():
    w = numpy.zeros((2, 2))
    cases = [(("0.w", w, numpy.zeros((5, 5))), r"0.w: a parameter of shape \(2, 2\) and a gradient of shape \(5, 5\)"),
             ((1, w, w), "a name of type int"), (("w", [1.0], w), "w: a list and a ndarray, where two arrays belong")]
    for triple, problem in cases:
        with pytest.raises(TypeError, match=rf"triples; got {problem}$"):
            optim.SGD([triple], lr=1.0)


def test_a_parameter_listed_twice_is_refused_rather_than_sharing_its_state():
    """Two layers' named_parameters() are both 'w', 'b': Adam's state, kept by name, would be shared (and, for
    a larger second parameter, overrun: the compiled update wrote past the end of the first one's moments)."""
    import mnn
    small, big = mnn.LinearLayer(4, 2), mnn.LinearLayer(8, 8)
    for triples in (small.named_parameters() + big.named_parameters(),
                    small.named_parameters() + [("again", small.params["w"], small.grads["w"])]):
        with pytest.raises(ValueError, match=r"AdamW: (w|again) is listed twice; give each parameter once"):
            optim.AdamW(triples, lr=1e-2)
    with pytest.raises(ValueError, match="clip_grad_norm: w is listed twice"):
        optim.clip_grad_norm(small.named_parameters() * 2, 1.0)


def test_clip_grad_norm_wants_triples_and_sums_half_precision_in_double():
    with pytest.raises(TypeError, match=r"clip_grad_norm: pass a network.*got an array of shape \(3, 4\)"):
        optim.clip_grad_norm([numpy.full((3, 4), 10.0)], 1.0)  # its rows were unpacked as name, parameter, grad
    grad = numpy.full(70000, 10, numpy.float16)  # a norm of 2646: float16's squares would sum to inf
    assert optim.clip_grad_norm([("g", numpy.zeros_like(grad), grad)], 1.0) == pytest.approx(2645.75, rel=1e-6)
    assert grad[0] == pytest.approx(10 / 2645.75, rel=1e-3)  # clipped, not zeroed


def test_a_state_whose_schedule_ended_at_zero_loads():
    import mnn
    net = mnn.SequentialLayers([mnn.LinearLayer(2, 2)])
    adam = optim.AdamW(net, lr=1e-3)
    adam.lr = optim.CosineSchedule(1e-3, 10)(10)  # 0.0 at the end, min_lr 0
    optim.AdamW(net, lr=1e-3).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("mode", ["numpy", "fused"])
def test_adam_takes_a_gradient_whose_square_overflows_as_torch_does(mode):
    """g = 1e20 in float32: g g is inf, but (1 - beta2) g g is 1e37. Squared first, v stayed infinite and the
    weight never moved again; PyTorch multiplies (1 - beta2) g first."""
    from mnn import kernels

    before = kernels.mode()
    kernels.use(mode)
    try:
        param, grad = numpy.full(3, 0.5, numpy.float32), numpy.zeros(3, numpy.float32)
        ours = optim.Adam([("w", param, grad)], lr=0.01)
        tensor = torch.tensor(param.copy(), requires_grad=True)
        theirs = torch.optim.Adam([tensor], lr=0.01)
        for value in (1e20, 1.0, 1.0):
            grad[...] = value
            tensor.grad = torch.tensor(grad.copy())
            ours.step()
            theirs.step()
            numpy.testing.assert_allclose(param, tensor.detach().numpy(), rtol=1e-6)
        assert numpy.isfinite(ours.buffers["w.v"]).all()
    finally:
        kernels.use(before)
