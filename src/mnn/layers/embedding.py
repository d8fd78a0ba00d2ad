r"""Embeddings: a table lookup for tokens, and learned positions added to them."""
import math

from .. import backend, kernels
from .base import Layer, check_array, check_in_range, check_size
from .sums import add_column_sums, column_sums


class EmbeddingLayer(Layer):
    r"""Token embedding: row $i$ of a table $E \in \mathbb{R}^{V \times d}$ (``weight``) for token $i$.

    $$y_{b,t} = E_{i_{b,t}}. \tag{1}$$

    The indices are integers, so there is no input gradient; each table row receives the
    gradients of every position that looked it up:

    $$\frac{\partial L}{\partial E_v} = \sum_{(b,t):\ i_{b,t} = v} g_{b,t}. \tag{2}$$

    Eq. (2) is a scatter-add (``add.at``), never a dense one-hot matrix, so it costs
    $O(B T d)$ whatever the vocabulary size. Initialisation: $\mathcal N(0, 1)$, as PyTorch.
    """

    def __init__(self, num_embeddings, dim):
        super().__init__()
        self.num_embeddings = check_size("EmbeddingLayer", "num_embeddings", num_embeddings)
        self.dim = check_size("EmbeddingLayer", "dim", dim)
        self.add_param("weight", backend.normal(1.0, (num_embeddings, dim)))

    def config(self):
        return {"num_embeddings": self.num_embeddings, "dim": self.dim}

    def forward(self, indices):
        check_array(self, indices, dtype="int64")
        if indices.dtype.kind not in "iu":
            raise ValueError(f"{self!r}: input must be integer token indices, got {indices.dtype}")
        if kernels.fused_gpu(self.params["weight"]):  # Eq. (1) in one launch, which counts the indices outside
            y, outside = kernels.cuda.embedding(self.params["weight"], kernels.cuda.device_labels(indices))
            check_in_range(self, indices, self.num_embeddings, "token indices", outside)
            self.save(indices)
            return y.reshape(*indices.shape, self.dim)  # one index (0-d) was made a vector of one
        check_in_range(self, indices, self.num_embeddings, "token indices")
        self.save(indices)
        return self.params["weight"][indices]  # Eq. (1)

    def backward(self, g):
        (indices,) = self.saved()
        if kernels.fused(g, self.grads["weight"]):
            kernels.cpu.embedding_backward(self.grads["weight"], indices, g)  # Eq. (2), a loop over the rows
            return None
        xp = backend.array_module(g)
        xp.add.at(self.grads["weight"], indices.reshape(-1), g.reshape(-1, self.dim))  # Eq. (2)
        return None  # integer inputs have no gradient


class PositionalEmbeddingLayer(Layer):
    r"""Learned positions: adds row $t$ of $P \in \mathbb{R}^{T_{\max} \times d}$ (``weight``) at position $t$.

    $$y_{b,t} = x_{b,t} + P_t. \tag{1}$$

    $$\frac{\partial L}{\partial x} = g, \qquad \frac{\partial L}{\partial P_t} = \sum_b g_{b,t}. \tag{2}$$

    Sequences shorter than $T_{\max}$ use the first rows. Initialisation: $\mathcal N(0, 1)$.
    """

    def __init__(self, context, dim):
        super().__init__()
        self.context = check_size("PositionalEmbeddingLayer", "context", context)
        self.dim = check_size("PositionalEmbeddingLayer", "dim", dim)
        self.add_param("weight", backend.normal(1.0, (context, dim)))

    def config(self):
        return {"context": self.context, "dim": self.dim}

    def forward(self, x):
        self.check_input(x, ndim=3, last_dim=self.dim)
        if x.shape[1] > self.context:
            raise ValueError(f"{self!r}: sequence of length {x.shape[1]} (input {tuple(x.shape)}) exceeds "
                             f"the context {self.context}")
        self.save(x.shape[1])
        return x + self.params["weight"][:x.shape[1]]  # Eq. (1)

    def backward(self, g):
        (length,) = self.saved()
        rows = g.reshape(len(g), math.prod(g.shape[1:]))  # not -1, which an empty batch leaves undefined
        used = self.grads["weight"][:length]
        if used.flags.c_contiguous:
            add_column_sums(used.reshape(-1), rows)  # Eq. (2), into a view of the gradient
        else:
            used += column_sums(rows).reshape(g.shape[1:])  # Eq. (2)
        return g
