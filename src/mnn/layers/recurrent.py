r"""Recurrent layers, trained by back-propagation through time: ``RNNLayer``, ``LSTMLayer``, ``GRULayer``.

``RecurrentLayer`` derives what all three share (the loop over time, the sums over time
for the weights, the state carried between calls); each cell derives its own gates.
"""
import math

from .. import backend, kernels
from .base import Layer, check_flag, check_floating, check_size
from .sums import add_product, column_sums


def sigmoid(a, out=None):
    r"""$\sigma(a) = \tfrac12 (1 + \tanh(a/2))$, which never overflows; $\sigma' = \sigma (1 - \sigma)$.

    In place, with no temporaries, for the gates. Its absolute error stays below the dtype's
    epsilon; only far in the tail (``SigmoidLayer``'s concern, a gate's is not) is the tiny
    value itself rounded to 0."""
    xp = backend.array_module(a)
    s = xp.multiply(a, 0.5, out=out)
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


class RecurrentLayer(Layer):
    r"""What every recurrent layer shares: back-propagation through time, weights, state.

    **One cell, applied at every step.** A recurrent layer reads a sequence
    $x_1, \dots, x_T \in \mathbb{R}^D$ and carries a hidden state $h_t \in \mathbb{R}^H$
    from step to step, $h_t = \operatorname{cell}(x_t, h_{t-1})$, starting from $h_0$
    (zeros unless given); its output is the state at every step, $y_t = h_t$. The RNN's and
    the LSTM's cells start from the pre-activations of their $G$ gates, stacked, one affine
    map of the input and one of the previous state (the GRU keeps the two maps apart, as
    ``GRULayer`` derives, and so receives two gradients, $\Delta^x$ and $\Delta^h$, below):

    $$a_t = W_{ih}\, x_t + b_{ih} + W_{hh}\, h_{t-1} + b_{hh}, \qquad
      W_{ih} \in \mathbb{R}^{GH \times D},\ W_{hh} \in \mathbb{R}^{GH \times H}. \tag{T1}$$

    **Back-propagation through time.** Unrolled over $T$ steps the layer is a deep network
    whose steps share one set of weights. The state $h_t$ reaches the loss along two paths:
    through the output $y_t$ (the next layer's gradient $g_t = \partial L/\partial y_t$) and
    through the next step. So, from the last step back to the first,

    $$\frac{\partial L}{\partial h_t} = g_t + \Big(\frac{\partial h_{t+1}}{\partial h_t}\Big)^{\!\top}
      \frac{\partial L}{\partial h_{t+1}}, \tag{T2}$$

    where at $t = T$ the second term is the gradient w.r.t. the final state (zero unless
    given). Each cell turns $\partial L/\partial h_t$ into $\delta_t = \partial L/\partial a_t$.
    Eq. (T1) is linear in $h_{t-1}$, so the path through $a_t$ adds to the second term of
    Eq. (T2), written for $h_{t-1}$,

    $$\Big(\frac{\partial a_t}{\partial h_{t-1}}\Big)^{\!\top} \delta_t = W_{hh}^\top \delta_t. \tag{T3}$$

    **Shared weights: sums over time.** A weight used at every step receives the gradient
    of every use: Eq. (2) of ``LinearLayer``, summed over the batch and the steps,

    $$\frac{\partial L}{\partial W_{ih}} = \sum_{b,t} \delta_t\, x_t^\top, \quad
      \frac{\partial L}{\partial W_{hh}} = \sum_{b,t} \delta_t\, h_{t-1}^\top, \quad
      \frac{\partial L}{\partial b_{ih}} = \frac{\partial L}{\partial b_{hh}} = \sum_{b,t} \delta_t, \quad
      \frac{\partial L}{\partial x_t} = W_{ih}^\top \delta_t, \tag{T4}$$

    where for the GRU $\delta_t$ is $\delta^x_t$ for $W_{ih}$, $b_{ih}$ and $x_t$, and $\delta^h_t$ for
    $W_{hh}$ and $b_{hh}$ (``GRULayer``, Eq. (6)).

    **Batched, and what must loop.** Only the recurrence, $h_t$ from $h_{t-1}$, runs step by
    step. The input half of Eq. (T1) does not depend on the state, so it is computed for
    all steps at once, one GEMM over the $BT$ rows of $X$:

    $$A = X W_{ih}^\top + b_{ih}, \qquad A \in \mathbb{R}^{BT \times GH}. \tag{T5}$$

    Backward stores each step's $\delta_t$ (a row per sample, as $x_t$ is) in the rows of
    $\Delta \in \mathbb{R}^{BT \times GH}$; after the loop Eq. (T4) is one GEMM each, with
    $H_{\text{prev}}$ stacking $h_0, \dots, h_{T-1}$ in the same row order:

    $$\nabla W_{ih} \mathrel{+}= \Delta^\top X, \qquad \nabla W_{hh} \mathrel{+}= \Delta^\top H_{\text{prev}},
      \qquad \nabla b \mathrel{+}= \textstyle\sum_{\text{rows}} \Delta, \qquad \nabla X = \Delta W_{ih}. \tag{T6}$$

    Inside the loop the batched Eq. (T3) is $\Delta_t W_{hh}$, one small GEMM per step.
    The rows are ordered time-major, $(T, B, \cdot)$, inside the layer (input and output stay
    batch-first): each step then reads and writes one contiguous block, where batch-first
    slices ``[:, t]`` jump $T$ rows between samples, which costs the cache twice the time.

    **State.** ``forward(x, state=None)`` returns $(h_1, \dots, h_T)$ shaped ``(B, T, H)``.
    The initial state is ``state`` if given, else ``self.initial_state``, else zeros; a
    state is an array ``(B, H)`` ($h$), or for the LSTM a pair ``(h, c)`` (PyTorch's are
    ``(1, B, H)``, one per layer: PyTorch's ``h0[0]`` is the ``h0`` here). After forward,
    ``self.final_state`` holds $h_T$ (or $(h_T, c_T)$). To carry state across batches,
    as truncated BPTT does, set ``layer.initial_state = layer.final_state`` before the next
    call (``None`` starts again from zeros): the gradient then stops at the batch boundary.
    ``backward(g, final_state_grad=None)`` takes $g = \partial L/\partial Y$ and, optionally,
    the gradient w.r.t. the final state (same structure as the state); it returns
    $\partial L/\partial X$ (``None`` when ``input_grad`` is False) and leaves
    $\partial L/\partial h_0$ (or the pair) in ``self.state_grad``.

    Weights are named and shaped as PyTorch's (``weight_ih``, ``weight_hh``, ``bias_ih``,
    ``bias_hh``, gates stacked in PyTorch's order) and initialised as PyTorch does,
    $U(-1/\sqrt H, 1/\sqrt H)$.
    """

    gates = 1  # G: how many gates are stacked in weight_ih and weight_hh
    state_names = ("h",)  # the LSTM carries ("h", "c")

    def __init__(self, input_size, hidden_size, bias=True):
        super().__init__()
        self.input_size = check_size(type(self).__name__, "input_size", input_size)
        self.hidden_size = check_size(type(self).__name__, "hidden_size", hidden_size)
        self.bias = check_flag(type(self).__name__, "bias", bias)
        bound, rows = 1 / math.sqrt(hidden_size), self.gates * hidden_size
        self.add_param("weight_ih", backend.uniform(-bound, bound, (rows, input_size)))
        self.add_param("weight_hh", backend.uniform(-bound, bound, (rows, hidden_size)))
        if bias:
            self.add_param("bias_ih", backend.uniform(-bound, bound, (rows,)))
            self.add_param("bias_hh", backend.uniform(-bound, bound, (rows,)))
        self.initial_state = None
        self.final_state = None
        self.state_grad = None

    def config(self):
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "bias": self.bias}

    # -- state: a tuple of (B, H) arrays inside, an array (or the LSTM's pair) outside --------
    def unpack_state(self, state, batch, xp, dtype, what="initial state"):
        """The state as a tuple of (B, H) arrays: zeros for None, else checked."""
        shape = (batch, self.hidden_size)
        if state is None:
            return tuple(xp.zeros(shape, dtype=dtype) for _ in self.state_names)
        parts = tuple(state) if len(self.state_names) > 1 and isinstance(state, (tuple, list)) else (state,)
        if len(parts) != len(self.state_names) or any(not hasattr(p, "shape") for p in parts):
            form = "a pair (h, c) of arrays" if len(self.state_names) > 1 else "an array"
            raise ValueError(f"{self!r}: {what} must be {form} of shape {shape}, got {described(state)}")
        for name, part in zip(self.state_names, parts):
            if tuple(part.shape) != shape:
                raise ValueError(f"{self!r}: {what} {name} of shape {tuple(part.shape)}; expected {shape} "
                                 "(batch, hidden_size)")
            check_floating(self, part, f"{what} {name}")
        return parts

    # -- the parts every cell shares ------------------------------------------------------------
    def start(self, x, state):
        """Check the input and the initial state; return X's rows time-major, $X W_{ih}^\\top$ (Eq. (T5))
        shaped (T, B, GH), and the initial state as a tuple."""
        self.check_input(x, ndim=3, last_dim=self.input_size)
        batch, length, _ = x.shape
        if batch == 0 or length == 0:
            raise ValueError(f"{self!r}: input of shape {tuple(x.shape)}; expected at least one sample and one "
                             f"step, (batch, time, {self.input_size})")
        xp, w_ih = backend.array_module(x), self.params["weight_ih"]
        state = self.unpack_state(self.initial_state if state is None else state, batch, xp,
                                  xp.result_type(x.dtype, w_ih.dtype))
        rows = swap_batch_time(x).reshape(length * batch, self.input_size)
        a = rows @ w_ih.T  # Eq. (T5)
        return rows, a.reshape(length, batch, -1), state

    def state_product(self, h):
        r"""$h\, W_{hh}^\top$ for a (B, H) state (Eq. (T1)), computed as $(W_{hh} h^\top)^\top$: OpenBLAS
        multiplies these shapes faster with the large matrix on the left (about 1.3x per step here)."""
        return (self.params["weight_hh"] @ h.T).T

    def state_gradient(self, delta, w_hh_t):
        r"""$\delta\, W_{hh}$ (Eq. (T3)) as $(W_{hh}^\top \delta^\top)^\top$, for the same reason;
        ``w_hh_t`` is $W_{hh}^\top$, made contiguous once per backward pass."""
        return (w_hh_t @ delta.T).T

    def state_weights_t(self):
        r"""$W_{hh}^\top$, contiguous: made once per backward pass for ``state_gradient``."""
        return backend.array_module(self.params["weight_hh"]).ascontiguousarray(self.params["weight_hh"].T)

    def finish_backward(self, rows_x, h0, y, delta_x, delta_h=None):
        """Eq. (T6): the weight gradients and the input gradient, one GEMM each after the loop.

        ``y``, ``delta_x`` and ``delta_h`` are time-major. ``delta_x`` is the gradient w.r.t.
        the input half of Eq. (T1), ``delta_h`` w.r.t. the state half; they are the same
        $\\Delta$ except in the GRU.
        """
        xp = backend.array_module(y)
        delta_h = delta_x if delta_h is None else delta_h
        length, batch, _ = y.shape
        rows_dx, rows_dh = delta_x.reshape(length * batch, -1), delta_h.reshape(length * batch, -1)
        h_prev = xp.concatenate([h0[None], y])[:length].reshape(length * batch, -1)  # h_0, ..., h_{T-1}
        add_product(self.grads["weight_ih"], rows_dx.T, rows_x)  # Eq. (T6)
        add_product(self.grads["weight_hh"], rows_dh.T, h_prev)  # Eq. (T6)
        if self.bias:
            bias_grad = column_sums(rows_dx)  # Eq. (T6)
            self.grads["bias_ih"] += bias_grad
            self.grads["bias_hh"] += bias_grad if delta_h is delta_x else column_sums(rows_dh)
        if not self.input_grad:
            return None
        return swap_batch_time((rows_dx @ self.params["weight_ih"]).reshape(length, batch, -1))  # Eq. (T6)


def same_dtype(*arrays):
    """Whether the arrays share one dtype: the fused kernels keep each step's values in it, where the
    reference lines follow NumPy's promotions (a float64 state carries a float32 layer in float64)."""
    return len({array.dtype for array in arrays}) == 1


def sequence_parts(batch, *arrays):
    """The batch's parts for ``kernels.cpu_sequence`` where it runs these arrays (float32), else None:
    the step kernels then run."""
    if any(array.dtype != "float32" for array in arrays):
        return None
    return kernels.cpu_sequence.parts(batch)


def described(state):
    """What was given as a state, with shapes: 'a tuple of 2: (2, 5), (2, 5)', 'an array of shape (2, 5)'."""
    if isinstance(state, (tuple, list)):
        shapes = ", ".join(str(tuple(part.shape)) if hasattr(part, "shape") else type(part).__name__ for part in state)
        return f"a {type(state).__name__} of {len(state)}: {shapes}"
    return f"an array of shape {tuple(state.shape)}" if hasattr(state, "shape") else type(state).__name__


def swap_batch_time(x):
    """(B, T, n) <-> (T, B, n), a new contiguous array: never a view of ``x``, even where B or T is 1, so an
    output changed in place cannot change what backward saved."""
    return x.transpose(1, 0, 2).copy()


class RNNLayer(RecurrentLayer):
    r"""Elman recurrent layer with $\tanh$, as ``torch.nn.RNN`` (one layer, ``batch_first=True``).

    **Forward.** One gate ($G = 1$): Eq. (T1), squashed,

    $$h_t = \tanh a_t, \qquad a_t = W_{ih}\, x_t + b_{ih} + W_{hh}\, h_{t-1} + b_{hh}. \tag{1}$$

    **Backward through time.** $\tanh' = 1 - \tanh^2$, so by Eqs. (T2) and (T3), from $t = T$ down,

    $$\frac{\partial L}{\partial h_t} = g_t + W_{hh}^\top \delta_{t+1}, \tag{2}$$

    $$\delta_t = \frac{\partial L}{\partial h_t} \odot (1 - h_t^2), \tag{3}$$

    with the final state's gradient in place of $W_{hh}^\top \delta_{T+1}$. The initial state
    receives $\partial L/\partial h_0 = W_{hh}^\top \delta_1$; the weights, Eq. (T6).
    ``RecurrentLayer`` describes the state in and out.
    """

    def forward(self, x, state=None):
        rows, a, (h0,) = self.start(x, state)  # Eq. (T5)
        if self.bias:
            a += self.params["bias_ih"] + self.params["bias_hh"]  # Eq. (T5); b_hh enters every step, so here
        xp = backend.array_module(a)
        y, h = xp.empty_like(a), h0
        for t in range(a.shape[0]):
            h = y[t] = xp.tanh(a[t] + self.state_product(h))  # Eq. (1)
        self.save(rows, h0, y)
        self.final_state = h.copy()
        return swap_batch_time(y)

    def backward(self, g, final_state_grad=None):
        rows, h0, y = self.saved()
        xp, g = backend.array_module(y), swap_batch_time(g)
        w_hh_t = self.state_weights_t()
        (carry,) = self.unpack_state(final_state_grad, g.shape[1], xp, y.dtype, "final state gradient")
        delta = xp.empty_like(y)
        for t in reversed(range(y.shape[0])):
            dh = g[t] + carry  # Eq. (2)
            delta[t] = dh * (1 - y[t] * y[t])  # Eq. (3)
            carry = self.state_gradient(delta[t], w_hh_t)  # Eq. (T3)
        self.state_grad = carry
        return self.finish_backward(rows, h0, y, delta)  # Eq. (T6)


class LSTMLayer(RecurrentLayer):
    r"""Long short-term memory, as ``torch.nn.LSTM`` (one layer, ``batch_first=True``).

    **Forward.** Four gates ($G = 4$), stacked in PyTorch's order: Eq. (T1) splits into
    $a_t = [a^i; a^f; a^g; a^o]$, each $H$ rows, and

    $$i_t = \sigma(a^i), \quad f_t = \sigma(a^f), \quad \tilde c_t = \tanh(a^g), \quad
      o_t = \sigma(a^o), \tag{1}$$

    $$c_t = f_t \odot c_{t-1} + i_t \odot \tilde c_t, \tag{2}$$

    $$h_t = o_t \odot \tanh c_t. \tag{3}$$

    The state is the pair $(h_t, c_t)$: input, forget and output gates decide what the cell
    $c_t$ takes in, keeps, and shows.

    **Backward through time.** Two states carry gradient back. $h_t$ as in Eqs. (T2), (T3);
    $c_t$ reaches the loss through $h_t$ (Eq. (3)) and through $c_{t+1}$ (Eq. (2), with
    $\partial c_{t+1}/\partial c_t = \operatorname{diag}(f_{t+1})$):

    $$\frac{\partial L}{\partial h_t} = g_t + W_{hh}^\top \delta_{t+1}, \tag{4}$$

    $$\frac{\partial L}{\partial c_t} = \frac{\partial L}{\partial h_t} \odot o_t \odot (1 - \tanh^2 c_t)
      + \frac{\partial L}{\partial c_{t+1}} \odot f_{t+1}. \tag{5}$$

    The second term is the cell-state path: from step to step the gradient is only scaled
    by the forget gate, with no matrix and no squashing in between, where a plain RNN's
    passes through $W_{hh}^\top$ and $1 - h^2$ at every step (``RNNLayer``, Eqs. (2), (3))
    and tends to vanish: this is why an LSTM remembers longer. Eqs. (2), (3) then give the
    gradients w.r.t. the gate values,

    $$\frac{\partial L}{\partial i_t} = \frac{\partial L}{\partial c_t} \odot \tilde c_t, \quad
      \frac{\partial L}{\partial f_t} = \frac{\partial L}{\partial c_t} \odot c_{t-1}, \quad
      \frac{\partial L}{\partial \tilde c_t} = \frac{\partial L}{\partial c_t} \odot i_t, \quad
      \frac{\partial L}{\partial o_t} = \frac{\partial L}{\partial h_t} \odot \tanh c_t, \tag{6}$$

    and Eq. (1), with $\sigma' = \sigma(1 - \sigma)$ and $\tanh' = 1 - \tanh^2$, those w.r.t. the
    pre-activations, $\delta_t = [\delta^i; \delta^f; \delta^g; \delta^o]$:

    $$\delta_t = \Big[\frac{\partial L}{\partial i_t}; \frac{\partial L}{\partial f_t};
      \frac{\partial L}{\partial \tilde c_t}; \frac{\partial L}{\partial o_t}\Big] \odot
      \big[i_t (1 - i_t);\ f_t (1 - f_t);\ 1 - \tilde c_t^2;\ o_t (1 - o_t)\big]. \tag{7}$$

    The second factor depends only on the saved gates: one product for all four blocks. The
    fused CPU kernels compute a step's Eqs. (1)-(3) (``mnn.kernels.cpu.lstm_step_forward``) and
    Eqs. (4)-(7) (``lstm_step_backward``) with one pass over memory per element-wise chain. In
    float32 the samples' recurrences run apart instead: ``mnn.kernels.cpu_sequence`` runs every
    step, the products with $W_{hh}$ included, in one call per part of the batch, the parts side
    by side on OpenBLAS's threads (``mnn.kernels.threads``) where it lends two or more and each
    part gets eight samples. On a
    GPU (``mnn.kernels.cuda.lstm_step``) each is one launch that also computes the step's product
    with $W_{hh}$ (Eq. (T1) forward, the second term of Eq. (4) backward), a warp per unit and
    eight samples: a step there costs its launches, not its arithmetic.
    At $t = T$ the final state's gradients (zero unless given) stand in for the terms from
    step $T + 1$. The initial state receives $\partial L/\partial h_0 = W_{hh}^\top \delta_1$
    and $\partial L/\partial c_0 = \partial L/\partial c_1 \odot f_1$; the weights, Eq. (T6).
    ``RecurrentLayer`` describes the state in and out.
    """

    gates = 4
    state_names = ("h", "c")

    def forward(self, x, state=None):
        rows, a, (h0, c0) = self.start(x, state)  # Eq. (T5)
        xp, size, w_hh = backend.array_module(a), self.hidden_size, self.params["weight_hh"]
        bias = self.params["bias_ih"] + self.params["bias_hh"] if self.bias else xp.zeros(4 * size, a.dtype)
        fused = kernels.fused(a, h0, c0, w_hh, bias) and same_dtype(a, h0, c0)
        on_gpu = kernels.fused_gpu(a, h0, c0, w_hh, bias) and same_dtype(a, h0, c0, w_hh, bias)
        if on_gpu:  # the kernel reads memory in order
            h0, c0, w_hh = (xp.ascontiguousarray(array) for array in (h0, c0, w_hh))
        if self.bias and not (fused or on_gpu):
            a += bias  # Eq. (T5); b_hh enters every step, so here
        y, cells, tanh_cells = (xp.empty(a.shape[:2] + (size,), dtype=a.dtype) for _ in range(3))
        parts = fused and sequence_parts(a.shape[1], a, h0, c0, w_hh, bias)
        if parts:  # every step of Eqs. (T1), (1)-(3) in one call per part of the batch, the parts side by side
            h0, c0 = xp.ascontiguousarray(h0), xp.ascontiguousarray(c0)
            kernels.cpu_sequence.lstm_forward(a, w_hh, bias, h0, c0, y, cells, tanh_cells, parts)
        h, c = (y[-1], cells[-1]) if parts else (h0, c0)
        for t in range(0 if parts else a.shape[0]):
            gates = a[t]  # a view: the pre-activations, overwritten by the gates
            if fused:  # Eqs. (T1), (1)-(3) of a step in six passes, the bias added here
                product = self.state_product(h).T  # (4H, B), as the product is computed
                kernels.cpu.lstm_step_forward(gates, product, bias, c, cells[t], tanh_cells[t], y[t])
                h, c = y[t], cells[t]
                continue
            if on_gpu:  # the same in one launch, Eq. (T1)'s product included
                kernels.cuda.lstm_step(gates, h, w_hh, bias, c, cells[t], tanh_cells[t], y[t])
                h, c = y[t], cells[t]
                continue
            gates += self.state_product(h)  # Eq. (T1)
            c_tilde = xp.tanh(gates[:, 2 * size:3 * size])  # Eq. (1)
            sigmoid(gates, out=gates)  # Eq. (1): i, f, o (and the g block, replaced next)
            gates[:, 2 * size:3 * size] = c_tilde
            i, f, o = gates[:, :size], gates[:, size:2 * size], gates[:, 3 * size:]
            c = cells[t] = f * c + i * c_tilde  # Eq. (2)
            tanh_c = tanh_cells[t] = xp.tanh(c)
            h = y[t] = o * tanh_c  # Eq. (3)
        self.save(rows, h0, c0, a, cells, tanh_cells, y)
        self.final_state = (h.copy(), c.copy())
        return swap_batch_time(y)

    def backward(self, g, final_state_grad=None):
        rows, h0, c0, gates, cells, tanh_cells, y = self.saved()
        xp, size = backend.array_module(y), self.hidden_size
        g = swap_batch_time(g)
        carry_h, carry_c = self.unpack_state(final_state_grad, g.shape[1], xp, y.dtype, "final state gradient")
        delta = xp.empty_like(gates)
        arrays = (g, gates, carry_h, carry_c, c0, self.params["weight_hh"])  # the kernels keep one dtype
        fused = kernels.fused(*arrays) and same_dtype(*arrays)
        on_gpu = kernels.fused_gpu(*arrays) and same_dtype(*arrays)
        if on_gpu:  # the kernel reads memory in order
            carry_h, carry_c, c0 = (xp.ascontiguousarray(a) for a in (carry_h, carry_c, c0))
            carries = [xp.empty_like(carry_c) for _ in range(2)]  # each step writes one, reading the other
        parts = fused and sequence_parts(g.shape[1], g, gates, carry_h, carry_c, c0)
        if parts:  # every step of Eqs. (4)-(7) in one call per part of the batch; the carries become h0's and c0's
            carry_h, carry_c = (xp.array(carry, order="C") for carry in (carry_h, carry_c))  # copies: written
            kernels.cpu_sequence.lstm_backward(g, self.params["weight_hh"], gates, cells, tanh_cells,
                                               xp.ascontiguousarray(c0), carry_h, carry_c, delta, parts)
        w_hh_t = None if parts else self.state_weights_t()
        for t in reversed(range(0 if parts else y.shape[0])):
            tanh_c, c_prev = tanh_cells[t], cells[t - 1] if t else c0
            if fused:  # Eqs. (4)-(7) in two passes, carry_h read as the (H, B) columns the product gives
                carry_c = kernels.cpu.lstm_step_backward(g[t], carry_h.T, carry_c, gates[t], tanh_c, c_prev, delta[t])
                carry_h = self.state_gradient(delta[t], w_hh_t)
                continue
            if on_gpu:  # the same in one launch, Eq. (4)'s product with delta_{t+1} included
                delta_next = delta[t + 1] if t + 1 < len(delta) else None
                carry_out = carries[t % 2]
                kernels.cuda.lstm_step_backward(g[t], delta_next, w_hh_t, carry_h, carry_c, gates[t], tanh_c, c_prev,
                                                delta[t], carry_out)
                carry_c = carry_out
                if t == 0:
                    carry_h = delta[0] @ self.params["weight_hh"]  # Eq. (T3): the initial state's gradient
                continue
            i, f, c_tilde, o = (gates[t, :, k * size:(k + 1) * size] for k in range(4))
            dh = g[t] + carry_h  # Eq. (4)
            dc = dh * o * (1 - tanh_c * tanh_c) + carry_c  # Eq. (5)
            d = delta[t]  # a view: filled with Eq. (6), then multiplied by the slopes of Eq. (7)
            xp.multiply(dc, c_tilde, out=d[:, :size])  # Eq. (6)
            xp.multiply(dc, c_prev, out=d[:, size:2 * size])
            xp.multiply(dc, i, out=d[:, 2 * size:3 * size])
            xp.multiply(dh, tanh_c, out=d[:, 3 * size:])
            slope = gates[t] * (1 - gates[t])  # Eq. (7): sigma', and tanh' in the g block
            slope[:, 2 * size:3 * size] = 1 - c_tilde * c_tilde
            d *= slope  # Eq. (7)
            carry_h = self.state_gradient(d, w_hh_t)  # Eq. (T3): the second term of Eq. (4) at t - 1
            carry_c = dc * f  # the second term of Eq. (5) at t - 1
        self.state_grad = (carry_h, carry_c)
        return self.finish_backward(rows, h0, y, delta)  # Eq. (T6)


class GRULayer(RecurrentLayer):
    r"""Gated recurrent unit, as ``torch.nn.GRU`` (one layer, ``batch_first=True``).

    **Forward.** Three gates ($G = 3$) in PyTorch's order $r, z, n$. The reset gate $r$ acts
    inside the candidate, on the state half of its pre-activation only, so Eq. (T1) is kept
    in its two halves, $a^x_t = W_{ih} x_t + b_{ih}$ and $a^h_t = W_{hh} h_{t-1} + b_{hh}$,
    each split into $[\,\cdot^r; \cdot^z; \cdot^n]$:

    $$r_t = \sigma(a^{xr}_t + a^{hr}_t), \qquad z_t = \sigma(a^{xz}_t + a^{hz}_t), \tag{1}$$

    $$n_t = \tanh\big(a^{xn}_t + r_t \odot a^{hn}_t\big), \tag{2}$$

    $$h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1} = n_t + z_t \odot (h_{t-1} - n_t). \tag{3}$$

    **Backward through time.** With $\bar h_t = \partial L/\partial h_t$ from Eq. (T2), Eq. (3) gives

    $$\frac{\partial L}{\partial n_t} = \bar h_t \odot (1 - z_t), \qquad
      \frac{\partial L}{\partial z_t} = \bar h_t \odot (h_{t-1} - n_t), \tag{4}$$

    and through the squashing functions of Eqs. (1), (2), the gradients of the
    pre-activations inside $\sigma$ and $\tanh$:

    $$\delta^n = \frac{\partial L}{\partial n_t} \odot (1 - n_t^2), \quad
      \delta^r = \delta^n \odot a^{hn}_t \odot r_t (1 - r_t), \quad
      \delta^z = \frac{\partial L}{\partial z_t} \odot z_t (1 - z_t). \tag{5}$$

    The two halves of Eq. (T1) receive different gradients, because $r$ scales $a^{hn}$:

    $$\delta^x_t = [\delta^r; \delta^z; \delta^n], \qquad
      \delta^h_t = [\delta^r; \delta^z; r_t \odot \delta^n]. \tag{6}$$

    $h_{t-1}$ reaches $h_t$ directly (Eq. (3)) and through $a^h_t$ (Eq. (T3)), so the
    gradient it carries back is

    $$\bar h_t \odot z_t + W_{hh}^\top \delta^h_t; \tag{7}$$

    at $t = 1$ this is $\partial L/\partial h_0$. Eq. (T6) then uses $\Delta^x$ for $W_{ih}$,
    $b_{ih}$ and $X$, and $\Delta^h$ for $W_{hh}$ and $b_{hh}$.
    ``RecurrentLayer`` describes the state in and out.
    """

    gates = 3

    def forward(self, x, state=None):
        rows, a_x, (h0,) = self.start(x, state)  # Eq. (T5)
        if self.bias:
            a_x += self.params["bias_ih"]
        xp, size = backend.array_module(a_x), self.hidden_size
        gates = xp.empty_like(a_x)  # r, z, n at every step
        y, a_hn = (xp.empty(a_x.shape[:2] + (size,), dtype=a_x.dtype) for _ in range(2))
        h = h0
        for t in range(a_x.shape[0]):
            a_h = self.state_product(h)  # Eq. (T1), the state half
            if self.bias:
                a_h += self.params["bias_hh"]
            r_z = sigmoid(a_x[t, :, :2 * size] + a_h[:, :2 * size], out=gates[t, :, :2 * size])  # Eq. (1)
            r, z = r_z[:, :size], r_z[:, size:]
            a_hn[t] = a_h[:, 2 * size:]
            n = gates[t, :, 2 * size:] = xp.tanh(a_x[t, :, 2 * size:] + r * a_hn[t])  # Eq. (2)
            h = y[t] = n + z * (h - n)  # Eq. (3)
        self.save(rows, h0, gates, a_hn, y)
        self.final_state = h.copy()
        return swap_batch_time(y)

    def backward(self, g, final_state_grad=None):
        rows, h0, gates, a_hn, y = self.saved()
        xp, size = backend.array_module(y), self.hidden_size
        w_hh_t = self.state_weights_t()
        g = swap_batch_time(g)
        (carry,) = self.unpack_state(final_state_grad, g.shape[1], xp, y.dtype, "final state gradient")
        delta_x, delta_h = xp.empty_like(gates), xp.empty_like(gates)
        for t in reversed(range(y.shape[0])):
            r, z, n = (gates[t, :, k * size:(k + 1) * size] for k in range(3))
            h_prev = y[t - 1] if t else h0
            dh = g[t] + carry  # Eq. (T2)
            dx, dh_gates = delta_x[t], delta_h[t]
            d_n = dx[:, 2 * size:] = dh * (1 - z) * (1 - n * n)  # Eqs. (4), (5): delta^n
            dx[:, :size] = d_n * a_hn[t] * r * (1 - r)  # Eq. (5): delta^r
            dx[:, size:2 * size] = dh * (h_prev - n) * z * (1 - z)  # Eqs. (4), (5): delta^z
            dh_gates[:, :2 * size] = dx[:, :2 * size]  # Eq. (6)
            xp.multiply(r, d_n, out=dh_gates[:, 2 * size:])
            carry = dh * z + self.state_gradient(dh_gates, w_hh_t)  # Eq. (7)
        self.state_grad = carry
        return self.finish_backward(rows, h0, y, delta_x, delta_h)  # Eq. (T6)
