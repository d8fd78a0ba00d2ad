"""The training loop behind ``mnn train``: batches, steps, evaluation, checkpoints, resume.

It knows nothing of layer math: it calls ``net(x, y)``, ``net.backward()`` and the
optimizer, and writes a run folder with ``checkpoint.safetensors``, ``metrics.json``
and ``curves.png``. Under ``mpiexec`` it is one of several ranks (``mnn.distributed``):
each trains on its share of every batch, and rank 0 alone prints and writes.
"""
import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
from tqdm import tqdm

from . import backend, checkpoint_schema, models, optim
from .distributed import ONE_PROCESS
from .checkpoint import (CheckpointError, check_resume_step, load_checkpoint, read_resume_checkpoint,
                         save_checkpoint)
from .files import (Progress, atomic_write, counted, print_to_a_reader, quoted, remove_stale_temporaries,
                    tell)
from .plots import plot_curves
from .runs import BEST, CHECKPOINT, CURVES, METRICS, make_run_folder
from .tasks import ImageClassification

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint so ``--resume`` needs nothing else."""

    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    epochs: float = 20
    steps: int = 0  # total steps; 0 means epochs * steps per epoch
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    decay_vectors: bool = True  # False: no weight decay on biases and norm scales
    beta2: float = 0.999
    momentum: float = 0.9
    warmup_steps: int = 100
    clip: float = 0.0
    eval_every: int = 0  # 0 means once per epoch
    seed: int = 0
    data_dir: str = None
    limit: int = 0  # use only this many training samples (quick runs, tests)
    data: str = None  # your own data set (dataset "custom"): a folder of class folders, an .npz or a .csv
    patience: int = 0  # stop after this many evaluations without a better validation score (0: never)


TEXT_DATASETS = ("tinyshakespeare", "text")  # text: your own UTF-8 file (--data)
IMAGE_DATASETS = ("fashion-mnist", "mnist", "cifar10", "custom")


def make_task(config):
    text_model = config.model in models.TEXT_MODELS
    fitting = TEXT_DATASETS if text_model else IMAGE_DATASETS
    if config.dataset not in fitting:
        names = [name if name != "custom" else "your own images (--data)" for name in fitting]
        names = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))
        other = "--model mlp or --model cnn for images" if text_model else "--model gpt or --model lstm for text"
        raise ValueError(f"model {config.model!r} trains on {names}, not {config.dataset!r}: choose {other}")
    if text_model:
        from .text_task import TextTask
        return TextTask(config)
    return ImageClassification(config.dataset, config.batch_size, config.seed, config.data_dir, config.limit,
                               data=config.data, model=config.model)


def make_optimizer(config, net):
    if config.optimizer not in optim.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; expected one of {sorted(optim.OPTIMIZERS)}")
    decay = {"weight_decay": config.weight_decay, "decay_vectors": config.decay_vectors}
    if config.optimizer == "sgd":
        return optim.SGD(net, lr=config.lr, momentum=config.momentum, **decay)
    return optim.OPTIMIZERS[config.optimizer](net, lr=config.lr, betas=(0.9, config.beta2), **decay)


class Trainer:
    """One run: a task, a network, its optimizer and schedule, and where the run is written."""

    def __init__(self, config, run_dir, quiet=False, ranks=ONE_PROCESS):
        checkpoint_schema.config_fields(asdict(config), "TrainConfig")  # before any of them is used
        if backend.default_dtype() == numpy.float16:
            raise ValueError("training needs float32 or float64 parameters: in float16, Adam's eps and small "
                             "squared gradients round to 0 (mnn.backend.set_default_dtype)")
        self.config, self.run_dir, self.ranks = config, Path(run_dir), ranks
        self.quiet = quiet or not ranks.is_root
        self.share = ranks.share(config.batch_size)  # the rows of each batch this rank trains on
        backend.seed(config.seed)
        self.task = make_task(config)
        decided = self.task.model_defaults()  # by the data: classes, input size, vocabulary
        contradicted = [key for key, value in config.model_kwargs.items() if key in decided and value != decided[key]]
        if contradicted:
            key = contradicted[0]
            raise ValueError(f"TrainConfig.model_kwargs.{key} = {config.model_kwargs[key]!r}: the data decides it, "
                             f"{decided[key]!r}; leave it out")
        kwargs = {**decided, **config.model_kwargs}
        self.architecture = models.resolve({"name": config.model, "kwargs": kwargs})
        self.net = models.build(self.architecture)
        self.net.input_grad = False  # training needs parameter gradients only
        self.flat = self.net.flatten()  # one buffer per dtype: zeroed in one pass, all-reduced in one message
        join(ranks, self.net, self.flat)
        self.optimizer = make_optimizer(config, self.net)
        self.net.optimizer = self.optimizer
        checkpoint_schema.config(asdict(config), "TrainConfig")  # a setting no loader would take back: now
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.task.steps_per_epoch))
        self.eval_every = config.eval_every or self.task.steps_per_epoch
        self.schedule = self.make_schedule()
        self.step, self.metrics, self.running = 0, [], [0.0, 0]
        self.stop_signalled = False  # a signal reached this process
        self.stop_requested = False  # ... and the ranks agreed to stop (at once, with one rank)
        self.saved_at = None

    @classmethod
    def resume(cls, run_dir, quiet=False, steps=None, epochs=None, ranks=ONE_PROCESS, data_at=None):
        """Rebuild a run from its checkpoint and continue exactly where it stopped.

        ``steps`` or ``epochs`` extend (or shorten) the run to a new total; the cosine
        schedule is then recomputed for that total, so the remaining steps follow the curve
        of a run planned that long from the start. ``data_at`` is where the run's data now is,
        if it moved: it must be the same data (``check_same_data``)."""
        path = Path(run_dir) / CHECKPOINT
        for name in (CHECKPOINT, BEST, METRICS, CURVES) if ranks.is_root else ():
            remove_stale_temporaries(Path(run_dir) / name)
        document = read_resume_checkpoint(path)  # every field checked before it is used
        config = TrainConfig(**document["config"])
        if steps is not None or epochs is not None:
            config.steps, config.epochs = steps or 0, config.epochs if epochs is None else epochs
        if data_at is not None:  # your own images are config.data; a text or a built-in set's folder, data_dir
            setattr(config, "data" if config.dataset == "custom" else "data_dir", data_at)
        trainer = cls(config, run_dir, quiet, ranks)
        check_same_data(path, document, trainer.task.metadata(), config)
        if (steps is not None or epochs is not None) and document["step"] > trainer.total_steps:
            asked = f"--steps {steps}" if steps is not None else f"--epochs {epochs}"
            raise ValueError(f"{asked} ends the run at step {trainer.total_steps}, but it has reached step "
                             f"{document['step']} already: give a later end")
        check_resume_step(path, document["step"], trainer.total_steps)
        load_checkpoint(path, trainer.net, trainer.optimizer)
        trainer.step, trainer.metrics = document["step"], document["metrics"]
        trainer.running = document["running_loss"]
        trainer.saved_at = trainer.step
        backend.set_rng_state(document["rng_state"])
        return trainer

    def make_schedule(self):
        """Warm-up (at most all steps but the last), then cosine decay toward ``min_lr``, which the schedule
        reaches at step ``total_steps``, one past the last step trained (numbered from 0): the last step
        trains a little above it (by a fraction of about (pi / 2 / decay steps)^2 of the range)."""
        config = self.config
        warmup = min(config.warmup_steps, self.total_steps - 1)
        return optim.CosineSchedule(config.lr, self.total_steps, warmup, config.min_lr)

    def shorten_warmup(self, steps):
        """At most ``steps`` of warm-up, kept in the config (a resumed run goes on with it)."""
        if self.config.warmup_steps > steps:
            self.config.warmup_steps = steps
            self.schedule = self.make_schedule()

    # -- the loop -----------------------------------------------------------
    def run(self):
        """Train to the last step (or until Ctrl-C), checkpointing at every evaluation."""
        if self.ranks.is_root:
            make_run_folder(self.run_dir)
        # NumPy's overflow warnings would come before the one-line error; divergence is caught by the checks
        with self.stop_signals_caught(), numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
            with tqdm(total=self.total_steps, initial=self.step, disable=self.quiet, unit="step",
                      dynamic_ncols=True, file=Progress()) as bar:
                while True:
                    if self.evaluation_due():
                        self.evaluate(bar)
                    self.stop_requested = self.stop_requested or self.ranks.any(self.stop_signalled)
                    if self.step >= self.total_steps or self.stop_requested or self.out_of_patience():
                        break
                    self.train_step(bar)
        if self.stop_requested and self.finished():  # the stop came after the last evaluation: nothing left
            self.stop_requested = False
        if self.stop_requested:
            if self.saved_at != self.step:
                self.check_state_is_finite()
                self.save()
            self.say(f"interrupted: checkpoint saved at step {self.step}; continue with "
                     f"`mnn train --resume {quoted(self.run_dir)}`")
        return self.metrics

    def finished(self):
        """Every step trained and the last evaluation done (and saved with it)."""
        return self.step >= self.total_steps and not self.evaluation_due()

    def say(self, text, bar=None):
        """Print ``text`` (above the progress bar, if given): rank 0 alone talks to the user."""
        if self.ranks.is_root:
            print_to_a_reader(text, bar.write if bar is not None else print)

    @contextlib.contextmanager
    def stop_signals_caught(self):
        """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the step in flight."""
        if threading.current_thread() is not threading.main_thread():  # only it can catch signals
            yield
            return
        previous = {signum: signal.signal(signum, self.request_stop) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def request_stop(self, signum, frame):
        """Ctrl-C or SIGTERM: finish the step in flight, save, and exit (never a half-updated network).

        An evaluation in progress is abandoned. A second Ctrl-C stops at once, without saving."""
        self.stop_signalled = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum is not None and self.ranks.is_root:
            tell(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to quit without saving)\n")

    def train_step(self, bar):
        started = time.perf_counter()
        x, y = self.task.batch(self.step, self.share)
        self.optimizer.lr = self.schedule(self.step)
        if self.ranks.size > 1:  # each rank's dropout masks: reproducible for a given number of ranks
            backend.seed([self.config.seed, self.step, self.ranks.rank])
        self.net.zero_grads()
        loss = self.net(x, y)
        self.net.backward()
        self.ranks.average(self.flat.grads.values())  # the global batch's gradient (mnn.distributed, Eq. (1))
        loss = self.ranks.mean(float(loss))
        if not math.isfinite(loss):
            raise self.divergence_error(f"the training loss became {loss}")
        if self.config.clip:
            optim.clip_grad_norm(self.optimizer.parameters, self.config.clip)
        self.net.step()
        self.step += 1
        self.running = [self.running[0] + loss, self.running[1] + 1]
        rate = self.config.batch_size / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}", refresh=False)
        bar.update()

    def evaluation_due(self):
        """At every ``eval_every`` steps and at the end; not yet done (a stop can abandon one)."""
        at_mark = self.step % self.eval_every == 0 or self.step == self.total_steps
        done = bool(self.metrics) and self.metrics[-1]["step"] == self.step
        return self.step > 0 and at_mark and not done

    def evaluate(self, bar):
        """Evaluate, record and save; a stop requested meanwhile abandons it (a resumed run redoes it)."""
        scores = self.task.evaluate(self.net, stop=lambda: self.stop_signalled, ranks=self.ranks)
        if scores is None:
            self.stop_requested = True
            return
        if not math.isfinite(scores["val_loss"]):
            raise self.divergence_error(f"the validation loss became {scores['val_loss']}")
        self.check_state_is_finite()
        record = {"step": self.step, "epoch": round(self.step / self.task.steps_per_epoch, 3),
                  "train_loss": self.running[0] / max(self.running[1], 1), "lr": self.optimizer.lr, **scores}
        self.metrics.append(record)
        self.running = [0.0, 0]
        self.say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), bar)
        if self.best_evaluation() == len(self.metrics) - 1:  # first: the checkpoint then never names a best
            self.write_checkpoint(self.run_dir / BEST)  # that best.safetensors lacks
        self.save()
        if self.out_of_patience():
            waited = counted(self.config.patience, "evaluation")
            best = self.metrics[self.best_evaluation()]["step"]
            self.say(f"stopping early: no better validation score in {waited}; the best was at step {best} ({BEST})",
                     bar)

    def divergence_error(self, what):
        """The error that ends a run whose numbers overflowed: nothing past the last checkpoint is saved."""
        kept = f"; the checkpoint of step {self.saved_at} is kept" if self.saved_at else ""
        return FloatingPointError(f"{what} at step {self.step}: training diverged; start a new run with a lower "
                                  f"--lr{kept}")

    def check_state_is_finite(self):
        """Before a checkpoint: weights, running statistics or optimizer state that overflowed (Adam's
        squared gradients, a running variance can, while the losses stay finite) would be saved where
        no loader takes them back."""
        owner = type(self.optimizer).__name__
        arrays = [(name, param) for name, param, _ in self.net.named_parameters()] + self.net.named_buffers()
        arrays += [(f"{owner}'s {name}", buffer) for name, buffer in self.optimizer.buffers.items()]
        for name, array in arrays:
            if not bool(backend.array_module(array).isfinite(array).all()):
                raise self.divergence_error(f"{name} holds NaN or infinity")

    def best_evaluation(self):
        """Index of the record with the best validation score: accuracy, ties broken by the lower loss; a
        text model's, the loss (the first of equals)."""
        def score(record):
            return record.get("val_accuracy", 0.0), -record["val_loss"]
        return max(range(len(self.metrics)), key=lambda i: (*score(self.metrics[i]), -i))

    def out_of_patience(self):
        """True once ``patience`` evaluations in a row have not beaten the best one before them."""
        patience = self.config.patience
        return bool(patience and self.metrics) and len(self.metrics) - 1 - self.best_evaluation() >= patience

    def save(self):
        """Checkpoint, metrics.json and curves.png, each written whole or not at all (by rank 0)."""
        self.saved_at = self.step
        if not self.ranks.is_root:
            return
        self.write_checkpoint(self.run_dir / CHECKPOINT)
        text = json.dumps(self.metrics, indent=1).encode()
        atomic_write(self.run_dir / METRICS, lambda handle: handle.write(text))
        if self.metrics:
            plot_curves(self.metrics, self.run_dir / CURVES)

    def write_checkpoint(self, path):
        """Everything a resumed run needs: weights, optimizer state, settings, step, metrics, RNG state."""
        if not self.ranks.is_root:
            return
        save_checkpoint(path, self.net, self.architecture, self.optimizer, config=asdict(self.config),
                        step=self.step, metrics=self.metrics, running_loss=self.running,
                        rng_state=backend.get_rng_state(), **self.task.metadata())


def join(ranks, net, flat):
    """Make this rank's network rank 0's (weights and running statistics), and synchronise its batch norms."""
    ranks.broadcast([*flat.params.values(), *(buffer for _, buffer in net.named_buffers())])
    if ranks.size > 1:
        from .layers import BatchNormLayer
        from .seq_layers import walk

        for _, layer in walk(net):
            if isinstance(layer, BatchNormLayer):
                layer.batch_total = ranks.sum


def check_same_data(path, document, metadata, config):
    """A resumed run must see the data it began with: the same classes, normaliser, vocabulary, and
    the same values (its sha256, where the checkpoint holds one)."""
    fresh = json.loads(json.dumps(metadata))  # as the checkpoint holds them: lists, plain floats
    changed = [key for key in fresh if document.get(key, fresh[key]) != fresh[key]]  # older files lack some
    if changed:
        raise CheckpointError(f"{path}: {changed[0]}: the data changed since the run began "
                              f"({config.data or config.data_dir or config.dataset}); a resumed run would "
                              "train on other samples than the run began with")

