"""Language modelling on characters: random context windows, a 90/10 split, validation loss."""
import numpy

from .data.text import CharTokenizer, load_text
from .tasks import to_batch

EVAL_BATCHES = 40


class TextTask:
    """Batches of (context window, next characters) drawn at random, seeded by (seed, step)."""

    def __init__(self, config):
        text = load_text(config.data_dir)
        self.tokenizer = CharTokenizer.from_text(text)
        data = self.tokenizer.encode(text)
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]
        if config.limit:
            self.train = self.train[:config.limit]
        self.context = config.model_kwargs.get("context", 64)
        self.batch_size, self.seed = config.batch_size, config.seed
        self.steps_per_epoch = max(1, len(self.train) // (self.batch_size * self.context))

    def model_defaults(self):
        return {"vocab_size": len(self.tokenizer), "context": self.context}

    def metadata(self):
        return {"vocab": self.tokenizer.chars}

    def windows(self, data, rng):
        starts = rng.integers(0, len(data) - self.context, self.batch_size)
        chunk = data[starts[:, None] + numpy.arange(self.context + 1)]
        return to_batch(chunk[:, :-1], chunk[:, 1:])

    def batch(self, step):
        return self.windows(self.train, numpy.random.default_rng([self.seed, step]))

    def evaluate(self, net):
        """Mean loss over a fixed set of validation windows (the same at every evaluation)."""
        rng = numpy.random.default_rng([self.seed, 2 ** 31])
        net.eval()
        try:
            losses = [float(net(*self.windows(self.val, rng))) for _ in range(EVAL_BATCHES)]
        finally:
            net.train()
        return {"val_loss": sum(losses) / len(losses)}
