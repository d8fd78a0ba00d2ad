"""``mnn train``: its flags, the settings they make, and starting or resuming a run.

Light at import, as ``cli`` is: the trainer and the models are imported when a run starts.
"""
import argparse
import contextlib
import os
import time
from pathlib import Path

from .arguments import (count, non_negative, number, path_argument, positive, positive_int, probability,
                        widths)
from .files import counted, print_to_a_reader, quoted
from .runs import CHECKPOINT, MAX_EPOCHS, RUN_FILES, held_run_folder, require_folder_or_nothing

MODEL_DEFAULTS = {
    "mlp": {},
    "cnn": {"epochs": 12, "batch_size": 128, "lr": 2e-3},
    # nanoGPT's small CPU run, but with the settings that measured best for 2000 steps (README):
    # weight decay 0, warm-up 300, final learning rate 3e-4 (nanoGPT: 0.1, 100, 1e-4), untied head
    "gpt": {"dataset": "tinyshakespeare", "steps": 2000, "batch_size": 12, "lr": 1e-3, "min_lr": 3e-4,
            "weight_decay": 0.0, "decay_vectors": False, "beta2": 0.99, "warmup_steps": 300, "clip": 1.0,
            "eval_every": 250},
    "lstm": {"dataset": "tinyshakespeare", "steps": 2000, "batch_size": 32, "lr": 8e-3, "min_lr": 1e-4,
             "weight_decay": 0.0, "decay_vectors": False, "beta2": 0.99, "warmup_steps": 100, "clip": 1.0,
             "eval_every": 250},
}


def add_train_arguments(parser):
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), help="default: mlp")
    parser.add_argument("--dataset", choices=["fashion-mnist", "mnist", "cifar10", "tinyshakespeare"])
    parser.add_argument("--data", type=path_argument, metavar="PATH",
                        help="your own data: images for mlp and cnn (a folder of class folders, an .npz with "
                        "x_train, y_train[, x_test, y_test], or a .csv: a label column, then pixels), any UTF-8 text "
                        "file for gpt and lstm")
    parser.add_argument("--epochs", type=number(0, MAX_EPOCHS, high_inclusive=True),
                        help="passes over the training set (image models; mlp 20, cnn 12)")
    parser.add_argument("--steps", type=positive_int, help="total optimizer steps (overrides --epochs; gpt, lstm 2000)")
    parser.add_argument("--batch-size", type=positive_int, help="mlp 128, cnn 128, gpt 12, lstm 32")
    parser.add_argument("--lr", type=positive, help="peak learning rate, cosine decay after warm-up (mlp 1e-3, "
                        "cnn 2e-3, gpt 1e-3, lstm 8e-3)")
    parser.add_argument("--min-lr", type=non_negative, help="learning rate at the end of the decay (0; gpt 3e-4, "
                        "lstm 1e-4; a default is at most --lr)")
    parser.add_argument("--warmup", type=count, dest="warmup_steps",
                        help="linear warm-up steps (100; gpt 300; unless given, at most a quarter of the run)")
    parser.add_argument("--beta2", type=probability, help="Adam's second-moment decay (0.999; gpt, lstm 0.99)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="default: adamw")
    parser.add_argument("--weight-decay", type=non_negative, help="0.05; gpt, lstm 0")
    parser.add_argument("--clip", type=non_negative, help="global gradient-norm clip, 0: off (0; gpt, lstm 1)")
    parser.add_argument("--patience", type=count, help="stop when this many evaluations in a row bring no better "
                        "validation score (0, the default: never); best.safetensors keeps the best")
    parser.add_argument("--eval-every", type=positive_int, help="steps between evaluations (each epoch; gpt, lstm 250)")
    parser.add_argument("--seed", type=count, help="default: 0")
    parser.add_argument("--data-dir", type=path_argument,
                        help="folder with the data set's files (else cache, system, download)")
    parser.add_argument("--limit", type=positive_int, help="train on only this many samples (quick runs)")
    parser.add_argument("--out", type=path_argument, help="run folder (default runs/<model>-<time>)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace the run already in --out")
    parser.add_argument("--resume", type=path_argument, metavar="RUN",
                        help="continue the run in RUN (its folder or checkpoint); "
                        "--steps or --epochs extend it")
    size = parser.add_argument_group("model size")
    size.add_argument("--hidden", type=widths, help="hidden widths of the dense layers (mlp 512,256; cnn 128), "
                      "or the LSTM layers' hidden sizes (lstm 256,256)")
    size.add_argument("--channels", type=widths, help="CNN channels (32,64)")
    size.add_argument("--dropout", type=probability, help="mlp 0.2, cnn 0.3, gpt 0, lstm 0 (lstm: after each "
                      "LSTM layer)")
    size.add_argument("--layers", type=positive_int, help="GPT blocks (4)")
    size.add_argument("--heads", type=positive_int, help="GPT attention heads (4)")
    size.add_argument("--width", type=positive_int, help="token embedding width (gpt 128, lstm 64)")
    size.add_argument("--context", type=positive_int, help="characters per window, for training and sampling "
                      "(gpt, lstm 64)")
    size.add_argument("--tie-weights", action=argparse.BooleanOptionalAction,
                      help="GPT: share the token embedding with the output head (default: no)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], help="numpy (CPU, the default) or cupy (NVIDIA GPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


MODEL_SIZE_FLAGS = ("hidden", "channels", "dropout", "layers", "heads", "width", "context", "tie_weights")
TRAINING_FLAGS = ("data", "dataset", "epochs", "steps", "batch_size", "lr", "min_lr", "warmup_steps", "beta2",
                  "optimizer", "weight_decay", "clip", "eval_every", "seed", "data_dir", "limit", "patience")
RESUME_FLAGS = ("steps", "epochs")  # what --resume may change: how long the run goes on
PLACE_FLAGS = ("data", "data_dir")  # and where its data now is (checked to be the same data)


def config_from(args):
    model = args.model or "mlp"
    values = dict(MODEL_DEFAULTS[model])
    values.update({name: getattr(args, name) for name in TRAINING_FLAGS if getattr(args, name) is not None})
    kwargs = {flag: getattr(args, flag) for flag in MODEL_SIZE_FLAGS if getattr(args, flag) is not None}
    check_size_flags(model, kwargs)
    if args.epochs is not None and args.steps is None:
        values["steps"] = 0  # the epochs asked for, not the model's default step count
    if args.beta2 is not None and values.get("optimizer") == "sgd":
        raise ValueError("--beta2 is Adam's second-moment decay; --optimizer sgd has none")
    if args.min_lr is None and "min_lr" in values:  # the model's default, for a --lr below it, is --lr
        values["min_lr"] = min(values["min_lr"], values["lr"])
    if values.get("min_lr", 0) > values.get("lr", 1e-3):
        raise ValueError(f"--min-lr {values['min_lr']} exceeds the peak learning rate --lr {values.get('lr', 1e-3)}")
    if values.get("data") is not None:
        values.update(own_data(args, model, values.pop("data")))
    elif values.get("data_dir") is not None:  # recorded whole, so that --resume and mnn test find it from anywhere
        values["data_dir"] = os.path.abspath(values["data_dir"])
    from .train import TrainConfig

    return TrainConfig(model=model, model_kwargs=kwargs, **values)


def check_size_flags(model, kwargs):
    """A size flag the model does not take, told as the flag it is, with those it takes."""
    import inspect

    from .models import BUILDERS

    takes = inspect.signature(BUILDERS[model]).parameters
    unknown = [name for name in kwargs if name not in takes]
    if unknown:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in MODEL_SIZE_FLAGS if name in takes)
        raise ValueError(f"--{unknown[0].replace('_', '-')} is not a setting of the {model}, which takes {flags}")


def own_data(args, model, path):
    """The settings for ``--data PATH``: images for a classifier, any UTF-8 text file for a text model."""
    from .models import TEXT_MODELS

    given = [flag for flag in ("dataset", "data_dir") if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--data is your own data set; leave out --{given[0].replace('_', '-')}, which names "
                         "a built-in one")
    path = os.path.abspath(path)  # not resolve(): a pipe (<(...)) would become /proc/N/fd/pipe:[...], no path at all
    return {"dataset": "text", "data_dir": path} if model in TEXT_MODELS else {"dataset": "custom", "data": path}


def flags_given(args, names):
    """The flags among ``names`` given on the command line (every train flag's default is None)."""
    spelled = {"warmup_steps": "warmup"}  # a flag whose setting has another name
    return [f"--{spelled.get(name, name).replace('_', '-')}" for name in names if getattr(args, name) is not None]


def command_train(args):
    from . import backend, distributed

    backend.use(args.backend or "numpy")
    ranks = distributed.connect(args.backend or "numpy")  # under mpiexec -n N: one of N ranks
    if ranks.size > 1 and args.threads is None:
        backend.tune_cpu(ranks.threads())
    say = print_to_a_reader if ranks.is_root else (lambda *_: None)  # mnn train | head: it trains on
    with contextlib.ExitStack() as folder:  # the run folder, held by this process (rank 0) while it trains
        trainer = (resume_run if args.resume is not None else start_run)(args, ranks, say, folder)
        if trainer is None:
            return 0
        started = time.perf_counter()
        trainer.run()
    say(f"{time.perf_counter() - started:.1f} s; checkpoint {trainer.run_dir / CHECKPOINT}")
    if trainer.metrics and trainer.step == trainer.total_steps:
        image_model = "val_accuracy" in trainer.metrics[-1]
        test = f"mnn test {quoted(trainer.run_dir)}{test_data_flag(trainer.config)}"
        say(f"evaluate on the test set: {test}" if image_model else
            f"sample from it: mnn generate {quoted(trainer.run_dir)} --tokens 500 --top-k 20"
            + (' --prompt "ROMEO:"' if set("ROMEO:") <= set(trainer.task.tokenizer.chars) else ""))
    return 130 if trainer.stop_requested else 0


def test_data_flag(config):
    """What ``mnn test`` needs besides the run: held-out images, where the run's own data has no test split."""
    from .data.custom import has_test_split

    if config.dataset != "custom":
        return ""
    try:
        return "" if has_test_split(config.data) else " --data HELD_OUT_IMAGES"
    except (OSError, ValueError):  # the data moved or changed since: mnn test will say what is wrong
        return ""


def start_run(args, ranks, say, folder):
    config = config_from(args)
    run_dir = Path(args.out or f"runs/{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    require_folder_or_nothing(run_dir)
    if ranks.is_root:  # before looking at what the folder holds: a run may be writing there
        folder.enter_context(held_run_folder(run_dir))
    earlier = [name for name in RUN_FILES if (run_dir / name).exists()]
    if earlier and not args.overwrite:
        resume = f"continue it with --resume {quoted(run_dir)}, " if CHECKPOINT in earlier else ""
        raise ValueError(f"{run_dir} already holds a run ({', '.join(earlier)}); {resume}replace it with "
                         "--overwrite, or choose another --out")
    from .train import Trainer

    trainer = Trainer(config, run_dir, quiet=args.quiet, ranks=ranks)
    if args.warmup_steps is not None and args.warmup_steps >= trainer.total_steps:
        raise ValueError(f"--warmup {args.warmup_steps} leaves no step after the warm-up: the run has "
                         f"{trainer.total_steps} steps")
    if args.warmup_steps is None:  # a default warm-up takes at most a quarter of a short run, which then decays
        trainer.shorten_warmup(trainer.total_steps // 4)
    if args.overwrite and ranks.is_root:  # nothing of the run replaced may be taken for the new one's
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    on_ranks = f" on {ranks.size} ranks" if ranks.size > 1 else ""
    say(f"training {config.model} on {data_source(config)}{on_ranks}: {trainer.total_steps} steps -> {run_dir}")
    return trainer


def data_source(config):
    """What a run trains on, in words: the user's data, a text file, or a built-in data set."""
    from .models import TEXT_MODELS

    if config.data is not None:
        return config.data
    if config.data_dir is None:
        return config.dataset
    return config.data_dir if config.model in TEXT_MODELS else f"{config.dataset} from {config.data_dir}"


def resume_run(args, ranks, say, folder):
    """The run in ``args.resume``, extended to ``--steps``/``--epochs`` when given; None if it has finished."""
    fixed = flags_given(args, ("model", *TRAINING_FLAGS, *MODEL_SIZE_FLAGS, "out", "overwrite"))
    fixed = [flag for flag in fixed if flag not in flags_given(args, RESUME_FLAGS + PLACE_FLAGS)]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change when resuming: the run goes on with the settings in its "
                         "checkpoint (only --steps or --epochs, to extend it, --data or --data-dir, where its data "
                         "has moved, and --threads, --quiet, --backend, --debug)")
    places = [getattr(args, name) for name in PLACE_FLAGS if getattr(args, name) is not None]
    if len(places) > 1:
        raise ValueError("--data and --data-dir both name where the run's data now is: give one")
    run_dir = Path(args.resume)
    if run_dir.is_file() and run_dir.name != CHECKPOINT:
        raise ValueError(f"{run_dir}: --resume takes a run folder or the {CHECKPOINT} in it")
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if ranks.is_root and run_dir.is_dir():
        folder.enter_context(held_run_folder(run_dir, make=False))
    from .train import Trainer

    data_at = os.path.abspath(places[0]) if places else None
    try:
        trainer = Trainer.resume(run_dir, quiet=args.quiet, steps=args.steps, epochs=args.epochs, ranks=ranks,
                                 data_at=data_at)
    except FileNotFoundError as error:
        if data_at is not None:
            raise
        raise FileNotFoundError(f"{error}; if the data moved, give its new place: mnn train --resume "
                                f"{quoted(run_dir)} --data PATH (or --data-dir FOLDER for a built-in data set)"
                                ) from error
    if trainer.finished():
        say(f"{run_dir} has finished: step {trainer.step} of {trainer.total_steps}; "
              "extend it with --steps or --epochs")
        return None
    if trainer.out_of_patience():
        say(f"{run_dir} stopped early at step {trainer.step}: no better validation score in its last "
              f"{counted(trainer.config.patience, 'evaluation')} (--patience)")
        return None
    say(f"resuming {run_dir} at step {trainer.step} of {trainer.total_steps}")
    return trainer
