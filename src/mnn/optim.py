r"""Optimizers, learning-rate schedules and gradient clipping.

An optimizer holds ``(name, parameter, gradient)`` triples, as returned by
``net.named_parameters()``, and updates every parameter **in place**. With
``decay_vectors=False`` weight decay skips biases and norm scales (parameters with fewer
than two dimensions), as nanoGPT's GPT-2 training does. Each rule is
written as PyTorch's ``torch.optim`` counterpart computes it, so runs can be compared
step by step. Below $g$ is the gradient, $\theta$ the parameter, $t$ the step (from 1).

Every setting is checked where it enters, in the constructor or in ``load_state_dict``,
against the optimizer's ``rules``: a bad one raises a ValueError such as
``AdamW: lr must be a finite number > 0, got nan``.
"""
import math
import numbers
from typing import NamedTuple

import numpy

from . import backend, flat, kernels


def is_finite_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# A rule is (accepts, what it expects): the same rules check constructor arguments and the
# settings a checkpoint brings back.
POSITIVE = (lambda v: is_finite_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0")
BELOW_ONE = (lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)")
UP_TO_ONE = (lambda v: is_finite_number(v) and 0 <= v <= 1, "a number in [0, 1]")
FLAG = (lambda v: isinstance(v, bool), "True or False")
COUNT = (lambda v: is_integer(v) and v >= 0, "an integer >= 0")
POSITIVE_COUNT = (lambda v: is_integer(v) and v > 0, "an integer > 0")


def require(owner, name, value, rule):
    """``value`` if ``rule`` accepts it, else a ValueError naming ``owner`` and ``name``."""
    accepts, expected = rule
    if not accepts(value):
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}")
    return value


def names_list(names, limit=3):
    """The first few names, sorted: an error message stays one short line."""
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def checked_triples(owner, parameters):
    """The ``(name, parameter, gradient)`` triples as a list, or a TypeError saying what to pass: a
    bare list of arrays (PyTorch's habit) would otherwise be unpacked row by row and train nonsense."""
    expected = f"{owner}: pass a network, or its named_parameters(): (name, parameter, gradient) triples"
    if isinstance(parameters, dict) or not hasattr(parameters, "__iter__"):
        raise TypeError(f"{expected}; got {type(parameters).__name__}")
    triples = list(parameters)
    for item in triples:
        problem = triple_problem(item)
        if problem:
            raise TypeError(f"{expected}; got {problem}")
    names, arrays = set(), set()
    for name, param, _ in triples:  # buffers are kept by name: two parameters would share one (and overrun it)
        if name in names or id(param) in arrays:
            raise ValueError(f"{owner}: {name} is listed twice; give each parameter once, under a name of its own "
                             "(a network's named_parameters() prefix them by layer)")
        names.add(name)
        arrays.add(id(param))
    return triples


def triple_problem(item):
    """What makes ``item`` no (name, parameter, gradient) triple, or None."""
    if backend.is_array(item):
        return f"an array of shape {tuple(item.shape)}"
    if not (isinstance(item, tuple) and len(item) == 3):
        return f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
    name, param, grad = item
    if not isinstance(name, str):
        return f"a name of type {type(name).__name__}"
    if not (backend.is_array(param) and backend.is_array(grad)):
        return f"{name}: a {type(param).__name__} and a {type(grad).__name__}, where two arrays belong"
    if isinstance(param, numpy.generic) or isinstance(grad, numpy.generic):
        return f"{name}: a NumPy scalar, which cannot change in place (a 0-d array, numpy.array(x), can)"
    if param.shape != grad.shape:
        return f"{name}: a parameter of shape {tuple(param.shape)} and a gradient of shape {tuple(grad.shape)}"
    return None


class Optimizer:
    """Shared plumbing: parameters, learning rate, step count and per-parameter buffers.

    ``rules`` lists every setting (what ``state_dict`` saves) with what it must hold.
    """

    # lr > 0 to begin with (the constructor's check), >= 0 in a saved state: a schedule may end at 0
    rules = {"lr": NON_NEGATIVE, "decay_vectors": FLAG, "steps": COUNT}

    def __init__(self, parameters, lr, decay_vectors=True):
        if hasattr(parameters, "named_parameters"):
            parameters = parameters.named_parameters()
        self.parameters = checked_triples(type(self).__name__, parameters)
        self.lr = require(type(self).__name__, "lr", lr, POSITIVE)
        self.decay_vectors = decay_vectors
        self.steps = 0
        self.buffers, self.scratch = {}, {}

    @classmethod
    def check_settings(cls, settings):
        """Raise a ValueError naming the first setting that is unknown, missing or out of range."""
        unknown, missing = settings.keys() - cls.rules.keys(), cls.rules.keys() - settings.keys()
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown setting {names_list(unknown)}")
        if missing:
            raise ValueError(f"{cls.__name__}: setting {names_list(missing)} missing")
        for name, rule in cls.rules.items():
            require(cls.__name__, name, settings[name], rule)

    def settings(self):
        """Every setting named in ``rules``, by name."""
        return {name: getattr(self, name) for name in self.rules}

    def take_settings(self, settings):
        """Set ``settings`` (checked), each number as a Python number: a NumPy float32 beta would round
        ``1 - beta`` and ``beta ** t`` to float32 at every step, where a saved state, read back as Python
        floats, would not."""
        self.check_settings(settings)
        for name, value in settings.items():
            if not isinstance(value, bool):
                value = int(value) if is_integer(value) else float(value)
            setattr(self, name, value)

    def buffer_names(self, name, settings):
        """The buffers that a step with ``settings`` keeps for parameter ``name``."""
        return []

    def decay_of(self, param):
        """The weight-decay coefficient for this parameter."""
        return self.weight_decay if param.ndim >= 2 or self.decay_vectors else 0.0

    def buffer(self, name, like):
        """A zero buffer shaped like ``like``, created on first use; saved in checkpoints."""
        if name not in self.buffers:
            self.buffers[name] = backend.array_module(like).zeros_like(like)
        return self.buffers[name]

    def workspace(self, name, like):
        """Scratch memory shaped like ``like``, reused every step (not state: never saved)."""
        if name not in self.scratch:
            self.scratch[name] = backend.array_module(like).empty_like(like)
        return self.scratch[name]

    def step(self):
        """Update every parameter in place from its gradient (``update``, each rule's equations)."""
        for name, param, _ in self.parameters:
            if not getattr(param.flags, "writeable", True):  # flatten() replaced it by a view (mnn.flat.retire)
                raise RuntimeError(f"{type(self).__name__}: {name} is no longer the network's parameter: net.flatten() "
                                   "moved it into a flat buffer; create the optimizer after flatten(), or set it as "
                                   "net.optimizer before, which flatten() points at the buffer")
        self.steps += 1
        self.update_all()

    def update_all(self):
        """Apply the rule's equations to every parameter: ``update``, one tensor at a time."""
        for name, param, grad in self.parameters:
            self.update(name, param, grad)

    def zero_grads(self):
        """Set the gradients of the parameters this optimizer updates to 0, in place."""
        for _, _, grad in self.parameters:
            grad[...] = 0

    def state_dict(self):
        """JSON-ready settings (Python numbers and flags) and the buffers (arrays) by name."""
        settings = {name: value if isinstance(value, (bool, int)) else float(value)
                    for name, value in self.settings().items()}
        return {"settings": settings, "buffers": dict(self.buffers)}

    def load_state_dict(self, state):
        """Settings and buffers as ``state_dict`` returns them, all checked before anything changes.

        Each buffer is copied to its parameter's dtype and device: a float16 file loaded into
        a float32 network gives float32 moments, as a fresh run on that network would have.
        """
        settings, buffers = state["settings"], state["buffers"]
        self.check_settings(settings)
        self.buffers = self.check_buffers(buffers, settings)
        self.take_settings(settings)

    def check_buffers(self, buffers, settings):
        """The buffers copied to their parameters' dtypes and devices, after checking names, shapes and
        values (in the dtype they are loaded into: a float64 moment of 1e300 would be infinite in float32).

        Before the first step there are no buffers; after it, every one that ``buffer_names``
        lists, since each step updates every parameter."""
        owner, steps = type(self).__name__, settings["steps"]
        targets = {buffer: param for name, param, _ in self.parameters
                   for buffer in self.buffer_names(name, settings)} if steps else {}
        unknown, missing = buffers.keys() - targets.keys(), targets.keys() - buffers.keys()
        if unknown:
            raise ValueError(f"{owner}: unexpected buffer {names_list(unknown)} after {steps} steps")
        if missing:
            raise ValueError(f"{owner}: buffer {names_list(missing)} missing after {steps} steps")
        loaded = {}
        for name, target in targets.items():
            value = buffers[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{owner}: buffer {name} has shape {tuple(value.shape)}; "
                                 f"its parameter has {tuple(target.shape)}")
            if value.dtype.kind != "f":
                raise ValueError(f"{owner}: buffer {name} must hold finite floating-point numbers")
            xp = backend.array_module(target)
            with numpy.errstate(over="ignore"):  # a value beyond the dtype's range becomes infinite: refused next
                loaded[name] = xp.array(value, dtype=target.dtype)
            if not bool(xp.isfinite(loaded[name]).all()):
                raise ValueError(f"{owner}: buffer {name} must hold finite floating-point numbers within "
                                 f"{target.dtype}'s range, as its parameter's dtype")
            self.check_buffer_values(name, loaded[name])
        return loaded

    def check_buffer_values(self, name, value):
        """Raise a ValueError if a buffer holds values no run could have produced."""


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov and weight decay.

    $$g \leftarrow g + \lambda \theta \quad\text{(weight decay)} \tag{1}$$

    $$b \leftarrow \mu b + (1 - \tau) g \quad (b = g \text{ at the first step}) \tag{2}$$

    $$d = g + \mu b \ \text{(Nesterov)}, \qquad d = b \ \text{(otherwise)} \tag{3}$$

    $$\theta \leftarrow \theta - \eta\, d \tag{4}$$

    Without momentum ($\mu = 0$), $d = g$ and Eq. (4) is plain gradient descent.
    """

    rules = {**Optimizer.rules, "momentum": BELOW_ONE, "dampening": UP_TO_ONE, "nesterov": FLAG,
             "weight_decay": NON_NEGATIVE}

    def __init__(self, parameters, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 decay_vectors=True):
        super().__init__(parameters, lr, decay_vectors)
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay
        self.take_settings(self.settings())

    @classmethod
    def check_settings(cls, settings):
        super().check_settings(settings)
        if settings["nesterov"] and (settings["momentum"] <= 0 or settings["dampening"] != 0):
            raise ValueError(f"{cls.__name__}: Nesterov momentum needs momentum > 0 and dampening 0")

    def buffer_names(self, name, settings):
        return [f"{name}.momentum"] if settings["momentum"] else []

    def update(self, name, param, grad):
        if self.decay_of(param):
            grad = grad + self.decay_of(param) * param  # Eq. (1)
        if self.momentum:
            first = f"{name}.momentum" not in self.buffers
            velocity = self.buffer(f"{name}.momentum", param)
            if first:
                velocity[...] = grad
            else:
                velocity *= self.momentum
                velocity += (1 - self.dampening) * grad  # Eq. (2)
            grad = grad + self.momentum * velocity if self.nesterov else velocity  # Eq. (3)
        param -= self.lr * grad  # Eq. (4)


class Adam(Optimizer):
    r"""Adam (Kingma and Ba), with L2 weight decay added to the gradient as in ``torch.optim.Adam``.

    $$g \leftarrow g + \lambda\theta \tag{1}$$

    $$m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \tag{2}$$

    $$\theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\,
      \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} \tag{3}$$

    On CuPy, Eqs. (2)-(3) run as one fused kernel per parameter (``mnn.kernels.cuda.adam_update``),
    or per flat buffer where ``flatten`` laid the parameters out, as ``mnn train`` does
    (``FlatMoments``); on NumPy as one pass per parameter (``mnn.kernels.cpu.adam_update``).
    ``AdamW``'s decay runs in the same pass.
    """

    decoupled = False
    rules = {**Optimizer.rules, "beta1": BELOW_ONE, "beta2": BELOW_ONE, "eps": POSITIVE,
             "weight_decay": NON_NEGATIVE}

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_vectors=True):
        super().__init__(parameters, lr, decay_vectors)
        if isinstance(betas, numpy.ndarray) and betas.ndim == 1:
            betas = betas.tolist()
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{type(self).__name__}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.take_settings(self.settings())
        self.flat_cache = None  # FlatMoments, once a step made them

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.flat_cache = None  # flat moments, if any, are made again from the loaded buffers

    def buffer_names(self, name, settings):
        return [f"{name}.m", f"{name}.v"]

    def check_buffer_values(self, name, value):
        if name.endswith(".v") and bool((value < 0).any()):
            raise ValueError(f"{type(self).__name__}: buffer {name}, a mean of squares, holds negative values")

    def step_settings(self):
        """(beta1, beta2, step size, 1/sqrt(1 - beta2^t), eps): Eq. (3)'s numbers at this step."""
        step_size = self.lr / (1 - self.beta1 ** self.steps)
        unbias = 1 / math.sqrt(1 - self.beta2 ** self.steps)
        return self.beta1, self.beta2, step_size, unbias, self.eps

    def update_all(self):
        """On a GPU, where ``flatten`` laid every parameter in flat buffers: one launch per buffer
        (``FlatMoments``). Otherwise one update per tensor."""
        moments = self.flat_moments() if self.decoupled or not self.weight_decay else None  # Adam's decay: per tensor
        if moments is None:
            return super().update_all()
        shrink = 1 - self.lr * self.weight_decay  # AdamW's Eq. (1), for the tensors it decays
        for run in moments.runs:
            kernels.cuda.adam_update_flat(run.grad, run.codes, *self.step_settings(), shrink, run.param, run.m, run.v)

    def flat_moments(self):
        """The ``FlatMoments`` of this optimizer's parameters, made once and remade when they change;
        None where they are not all CuPy views into flat buffers."""
        key = ([(id(param), id(grad)) for _, param, grad in self.parameters], self.decay_vectors, kernels.mode())
        if self.flat_cache is None or self.flat_cache.key != key:
            self.flat_cache = FlatMoments.of(self, key)
        return self.flat_cache if self.flat_cache.runs else None

    def update(self, name, param, grad):
        decay = self.decay_of(param)
        if decay and not self.decoupled:
            grad = grad + decay * param  # Eq. (1)
        shrink = 1 - self.lr * decay if self.decoupled else 1.0  # AdamW's Eq. (1), in the kernels' pass
        m = self.buffer(f"{name}.m", param)
        v = self.buffer(f"{name}.v", param)
        beta1, beta2, step_size, unbias, eps = self.step_settings()
        xp = backend.array_module(param)
        settings = (beta1, beta2, step_size, unbias, eps, shrink)
        if kernels.fused_gpu(param) and grad.dtype == param.dtype:
            return kernels.cuda.adam_update(grad, *settings, param, m, v)
        if kernels.fused(param) and all(a.flags.c_contiguous for a in (grad, param, m, v)):
            return kernels.cpu.adam_update(grad, *settings, param, m, v)
        if shrink != 1:
            param *= shrink  # AdamW's Eq. (1)
        work = self.workspace(name, param)  # no temporaries on the hot path
        m *= self.beta1
        m += xp.multiply(grad, 1 - self.beta1, out=work)  # Eq. (2)
        v *= self.beta2
        xp.multiply(grad, 1 - self.beta2, out=work)  # (1 - beta2) g first, as PyTorch: g g overflows sooner
        work *= grad
        v += work
        xp.sqrt(v, out=work)  # Eq. (3), from the inside out
        work *= unbias
        work += self.eps
        xp.divide(m, work, out=work)
        work *= step_size
        param -= work


class FlatMoments:
    """Adam's moments m and v as flat buffers laid out as the parameters' (``mnn.flat``), so that one
    launch updates a whole buffer (``kernels.cuda.adam_update_flat``).

    Each run holds a flat parameter buffer, its gradient buffer, m and v of the same size, and a
    code per entry: 0 for one the optimizer leaves alone (padding, a parameter it does not hold),
    1 for a parameter it does not decay, 2 for one it does. The optimizer's buffers ``{name}.m``
    and ``{name}.v`` become views into m and v (values it held already, loaded ones too, copied in),
    so checkpoints keep them by name as before."""

    def __init__(self, key, runs):
        self.key, self.runs = key, runs

    @classmethod
    def of(cls, optimizer, key):
        triples = optimizer.parameters
        on_gpu = all(kernels.fused_gpu(param, grad) for _, param, grad in triples)
        groups = flat.buffers_behind(triples) if on_gpu and triples else None
        return cls(key, [cls.run(optimizer, *group) for group in groups] if groups else [])

    @staticmethod
    def run(optimizer, flat_param, flat_grad, members):
        xp = backend.array_module(flat_param)
        codes, m, v = numpy.zeros(flat_param.size, numpy.uint8), xp.zeros_like(flat_param), xp.zeros_like(flat_param)
        for index, offset in members:
            name, param, _ = optimizer.parameters[index]
            codes[offset:offset + param.size] = 2 if param.ndim >= 2 or optimizer.decay_vectors else 1
            for moment, buffer in (("m", m), ("v", v)):
                view = buffer[offset:offset + param.size].reshape(param.shape)
                if f"{name}.{moment}" in optimizer.buffers:
                    view[...] = optimizer.buffers[f"{name}.{moment}"]
                optimizer.buffers[f"{name}.{moment}"] = view
        return FlatRun(flat_param, flat_grad, xp.asarray(codes), m, v)


class FlatRun(NamedTuple):
    param: object
    grad: object
    codes: object
    m: object
    v: object


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov and Hutter), as ``torch.optim.AdamW``.

    $$\theta \leftarrow \theta\,(1 - \eta\lambda), \tag{1}$$

    then Adam's Eqs. (2)–(3) on the raw gradient (no $\lambda\theta$ added to $g$). ``Adam.update``
    applies Eq. (1) where ``decoupled`` says so.
    """

    decoupled = True

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_vectors=True):
        super().__init__(parameters, lr, betas, eps, weight_decay, decay_vectors)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def clip_grad_norm(parameters, max_norm):
    r"""Scale all gradients together so their global norm is at most ``max_norm`` ($c$ below).

    $$n = \sqrt{\textstyle\sum_p \lVert g_p \rVert^2}, \qquad
      g_p \leftarrow g_p \cdot \min\!\Big(1, \frac{c}{n + 10^{-6}}\Big). \tag{1}$$

    Returns $n$, the norm before clipping (as ``torch.nn.utils.clip_grad_norm_``).
    """
    require("clip_grad_norm", "max_norm", max_norm, POSITIVE)
    if hasattr(parameters, "named_parameters"):  # a network or a layer
        parameters = parameters.named_parameters()
    grads = [grad for _, _, grad in checked_triples("clip_grad_norm", parameters)]
    norm = math.sqrt(sum(float(squares(g).sum()) for g in grads))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g *= scale  # Eq. (1)
    return norm


def squares(g):
    """g * g, in float32 at least: float16's squares overflow from 256 on."""
    xp = backend.array_module(g)
    return xp.square(g, dtype=xp.promote_types(g.dtype, xp.float32))


class StepSchedule:
    r"""Multiply the learning rate by $\gamma$ every ``step_size`` steps: $\eta_t = \eta_0\,\gamma^{\lfloor t / s \rfloor}$."""

    def __init__(self, base_lr, step_size, gamma=0.1):
        require("StepSchedule", "base_lr", base_lr, POSITIVE)
        require("StepSchedule", "step_size", step_size, POSITIVE_COUNT)
        require("StepSchedule", "gamma", gamma, POSITIVE)
        self.base_lr, self.step_size, self.gamma = base_lr, step_size, gamma

    def __call__(self, step):
        return self.base_lr * self.gamma ** (step // self.step_size)


class CosineSchedule:
    r"""Linear warm-up for $w$ steps, then cosine decay to $\eta_{\min}$ at step $T$.

    $$\eta_t = \eta_0 \frac{t + 1}{w} \quad (t < w), \qquad
      \eta_t = \eta_{\min} + \tfrac12 (\eta_0 - \eta_{\min})\big(1 + \cos(\pi\, \tfrac{t - w}{T - w})\big)
      \quad (w \le t \le T),$$

    and $\eta_{\min}$ after step $T$.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, min_lr=0.0):
        require("CosineSchedule", "base_lr", base_lr, POSITIVE)
        require("CosineSchedule", "total_steps", total_steps, POSITIVE_COUNT)
        require("CosineSchedule", "warmup_steps", warmup_steps, COUNT)
        require("CosineSchedule", "min_lr", min_lr, (lambda v: is_finite_number(v) and 0 <= v <= base_lr,
                                                      f"a number in [0, base_lr = {base_lr}]"))
        if total_steps <= warmup_steps:
            raise ValueError(f"CosineSchedule: total_steps {total_steps} must exceed warmup_steps {warmup_steps}")
        self.base_lr, self.total, self.warmup, self.min_lr = base_lr, total_steps, warmup_steps, min_lr

    def __call__(self, step):
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
