"""The LSTM language model in mnn and in PyTorch, trained side by side from the same weights.

    python -m bench.lstm_reference                            # the run of `mnn train --model lstm`
    python -m bench.lstm_reference --steps 500 --json bench/lstm_reference.json
    python -m bench.lstm_reference --dtype float64 --steps 20 --hidden 32 --context 16

Any ``mnn train`` flag (``--steps``, ``--hidden``, ``--lr``, ``--seed``, ...) changes the run
as it changes ``mnn train --model lstm``: the flags go through the command line's own parser
and defaults (``mnn.train_command.config_from``), and mnn's side is an ``mnn.train.Trainer`` built from
them, so it is that command's run: its batches, network, AdamW, cosine schedule and clipping.

PyTorch's side is ``torch.nn.Embedding``, one ``torch.nn.LSTM`` (``batch_first``) per LSTM
layer and ``torch.nn.Linear`` (``bench/torch_mirror.py``), holding mnn's initial weights,
copied by name. It trains on the same batches (the Trainer's ``TextTask.batch(step)``), with
``torch.optim.AdamW`` set as mnn's optimizer is (betas, weight decay and the parameters it
skips), the learning rate of mnn's schedule at every step, and
``torch.nn.utils.clip_grad_norm_``. Both are evaluated by the same ``TextTask.evaluate``,
the mean loss over the whole validation split. With dropout the two draw different masks.

The two runs go one after the other (mnn first), on the same thread count, so neither
framework's worker threads slow the other; each step (batch, forward, backward, clipping,
update) is timed alone, evaluations excluded. Output: both validation curves, the largest
difference between them, and both step times (medians); with ``--json FILE`` the same as JSON.
mnn never imports this file.
"""
import argparse
import json
import statistics
import sys
import time

import numpy
import torch

from mnn import backend, cli
from mnn.train import Trainer
from mnn.train_command import config_from

from .torch_mirror import mirror

TOLERANCE = 0.02  # the acceptance: mnn's validation loss within this of torch's at every evaluation


class NoProgressBar:
    """What ``Trainer.train_step`` reports progress to."""

    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass


class TorchNet:
    """A torch model seen by ``TextTask.evaluate`` as an mnn network: ``net(x, y)`` is the mean loss."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn

    @property
    def training(self):
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)

    def __call__(self, x, y):
        with torch.no_grad():
            return self.loss_fn(self.model(as_indices(x)), as_indices(y)).item()


def as_indices(array):
    return torch.from_numpy(numpy.asarray(array, dtype=numpy.int64))


def torch_optimizer(config, model):
    """torch.optim.AdamW with mnn's settings; weight decay skips vectors unless ``decay_vectors``."""
    if config.optimizer != "adamw":
        raise ValueError(f"the reference trains with AdamW only, not {config.optimizer!r}")
    params = list(model.parameters())
    decayed = [p for p in params if p.dim() >= 2 or config.decay_vectors]
    kept = [p for p in params if not (p.dim() >= 2 or config.decay_vectors)]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, config.beta2), eps=1e-8)


def evaluation_steps(trainer):
    """The steps after which ``Trainer.run`` evaluates: every ``eval_every`` and the last."""
    return [s for s in range(1, trainer.total_steps + 1) if s % trainer.eval_every == 0 or s == trainer.total_steps]


def train_mnn(trainer, marks, log):
    curve, times, bar = [], [], NoProgressBar()
    for step in range(trainer.total_steps):
        started = time.perf_counter()
        trainer.train_step(bar)
        times.append(time.perf_counter() - started)
        if step + 1 in marks:
            curve.append(trainer.task.evaluate(trainer.net)["val_loss"])
            log(f"mnn   step {step + 1}: val loss {curve[-1]:.4f}")
    return curve, times


def train_torch(trainer, model, loss_fn, marks, log):
    config, task, schedule = trainer.config, trainer.task, trainer.schedule
    optimizer = torch_optimizer(config, model)
    curve, times, net = [], [], TorchNet(model, loss_fn)
    model.train()
    for step in range(trainer.total_steps):
        started = time.perf_counter()
        x, y = task.batch(step)
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(as_indices(x)), as_indices(y))
        loss.backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        times.append(time.perf_counter() - started)
        if step + 1 in marks:
            curve.append(task.evaluate(net)["val_loss"])
            log(f"torch step {step + 1}: val loss {curve[-1]:.4f}")
    return curve, times


def compare(train_flags=(), dtype="float32", threads=None, log=print):
    """Train mnn, then torch from mnn's initial weights; return both curves and step times."""
    args = cli.parser().parse_args(["train", "--model", "lstm", *train_flags])
    if args.model != "lstm":
        raise ValueError(f"the reference is for the lstm, not {args.model!r}")
    threads, _ = backend.tune_cpu(threads)
    torch.set_num_threads(threads)
    backend.use("numpy")
    previous = backend.default_dtype()
    backend.set_default_dtype(dtype)
    try:
        trainer = Trainer(config_from(args), run_dir="unused", quiet=True)
        model, loss_fn, _ = mirror(trainer.net, getattr(torch, dtype))  # the initial weights, before mnn trains
        marks = evaluation_steps(trainer)
        mnn_curve, mnn_times = train_mnn(trainer, set(marks), log)
        torch_curve, torch_times = train_torch(trainer, model, loss_fn, set(marks), log)
    finally:
        backend.set_default_dtype(previous)
    differences = [abs(a - b) for a, b in zip(mnn_curve, torch_curve)]
    mnn_ms, torch_ms = statistics.median(mnn_times) * 1e3, statistics.median(torch_times) * 1e3
    return {"architecture": trainer.architecture, "config": vars(trainer.config), "dtype": dtype,
            "threads": threads, "steps": marks, "mnn_val_loss": mnn_curve, "torch_val_loss": torch_curve,
            "max_difference": max(differences), "within_tolerance": max(differences) <= TOLERANCE,
            "mnn_ms_per_step": mnn_ms, "torch_ms_per_step": torch_ms, "ratio": mnn_ms / torch_ms,
            "mnn_train_s": sum(mnn_times), "torch_train_s": sum(torch_times)}


def report(result):
    lines = ["| step | mnn val loss | torch val loss | difference |", "|---|---|---|---|"]
    for step, ours, theirs in zip(result["steps"], result["mnn_val_loss"], result["torch_val_loss"]):
        lines.append(f"| {step} | {ours:.4f} | {theirs:.4f} | {ours - theirs:+.4f} |")
    verdict = "within" if result["within_tolerance"] else "NOT within"
    lines += ["", f"largest difference {result['max_difference']:.4f}: {verdict} {TOLERANCE} at every evaluation",
              f"step time ({result['threads']} threads, {result['dtype']}, evaluations excluded, median): "
              f"mnn {result['mnn_ms_per_step']:.1f} ms, torch {result['torch_ms_per_step']:.1f} ms, "
              f"mnn/torch {result['ratio']:.2f}x; training alone: mnn {result['mnn_train_s']:.0f} s, "
              f"torch {result['torch_train_s']:.0f} s"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.lstm_reference", description=__doc__.splitlines()[0],
                                     epilog="Other flags are mnn train's (see mnn train --help).")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: as mnn train)")
    parser.add_argument("--json", help="also write the results to this file")
    args, train_flags = parser.parse_known_args(argv)
    result = compare(train_flags, args.dtype, args.threads, log=lambda line: print(line, flush=True))
    print(report(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**result, "command": " ".join(["python -m bench.lstm_reference", *(argv or sys.argv[1:])])},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
