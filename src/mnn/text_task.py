"""Language modelling on characters: random context windows, a 90/10 split, validation loss."""
import numpy

from .data.text import CharTokenizer, locate_text, read_text
from .distributed import ONE_PROCESS
from .tasks import chunk_sums, evaluating, fingerprint, to_batch

EVAL_CHUNK = 128  # validation windows per forward pass


class TextTask:
    """Batches of (context window, next characters) drawn at random, seeded by (seed, step)."""

    def __init__(self, config):
        self.context = config.model_kwargs.get("context", 64)
        if not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"--context must be a whole number of characters, at least 1; got {self.context!r}")
        path = locate_text(config.data_dir)
        text = read_text(path)
        self.tokenizer = CharTokenizer.from_text(text)
        data = self.tokenizer.encode(text)
        self.fingerprint = fingerprint(data)
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]
        if config.limit:
            self.train = self.train[:config.limit]
        self.check_splits_hold_a_window(path, len(text), config.limit)
        self.batch_size, self.seed = config.batch_size, config.seed
        self.steps_per_epoch = max(1, len(self.train) // (self.batch_size * self.context))

    def check_splits_hold_a_window(self, path, characters, limit):
        """Training draws windows of context + 1 characters (inputs and the next-character targets), and
        validation cuts them: each split must hold one."""
        needed = self.context + 1
        for name, split, flag in (("training", self.train, " after --limit" if limit else ""),
                                  ("validation", self.val, "")):
            if len(split) < needed:
                raise ValueError(f"{path}: its {name} split has {len(split)} characters{flag} (of {characters}), "
                                 f"fewer than context + 1 = {needed}; give a longer text or a smaller --context")

    def model_defaults(self):
        return {"vocab_size": len(self.tokenizer), "context": self.context}

    def metadata(self):
        return {"vocab": self.tokenizer.chars, "data_sha256": self.fingerprint}

    def windows(self, data, rng, share=slice(None)):
        starts = rng.integers(0, len(data) - self.context, self.batch_size)[share]
        chunk = data[starts[:, None] + numpy.arange(self.context + 1)]
        return to_batch(chunk[:, :-1], chunk[:, 1:])

    def batch(self, step, share=slice(None)):
        """The global batch of ``step``, or the ``share`` of its windows that one rank trains on."""
        return self.windows(self.train, numpy.random.default_rng([self.seed, step]), share)

    def evaluate(self, net, stop=None, ranks=ONE_PROCESS):
        """Mean loss over the whole validation split, cut into non-overlapping context windows and a
        last, shorter one; None where ``stop()`` turns true between two chunks (the evaluation is
        abandoned). With several ``ranks``, each evaluates its own chunks and the sums are added up.

        Every character after the split's first is predicted once, so the number has no sampling
        noise (nanoGPT's 20 random batches move by about 0.02 from run to run)."""
        count, rest = divmod(len(self.val) - 1, self.context)
        inputs = self.val[:count * self.context].reshape(count, self.context)
        targets = self.val[1:count * self.context + 1].reshape(count, self.context)

        def loss(start, end):  # the chunk's mean, weighted by its size
            return [float(net(*to_batch(inputs[start:end], targets[start:end]))) * (end - start)]

        totals = chunk_sums(net, count, EVAL_CHUNK, loss, 1, ranks, stop)
        if totals is None:
            return None
        summed = float(totals[0]) * self.context + self.last_window_sum(net, count * self.context, rest, ranks)
        return {"val_loss": summed / (count * self.context + rest)}

    def last_window_sum(self, net, start, rest, ranks):
        """The loss summed over the split's last ``rest`` targets, fewer than a window: one shorter window,
        evaluated by the first rank."""
        total = 0.0
        if rest and ranks.is_root:
            with evaluating(net):
                window = to_batch(self.val[None, start:start + rest], self.val[None, start + 1:start + rest + 1])
                total = float(net(*window)) * rest
        return float(ranks.sum(total))
