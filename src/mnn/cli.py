"""The ``mnn`` command: train, test, generate, gradcheck, bench."""
import argparse
import sys
import time
from pathlib import Path

from . import __version__, backend
from .train import CHECKPOINT, TrainConfig, Trainer

MODEL_DEFAULTS = {
    "mlp": {},
    "cnn": {"epochs": 12, "batch_size": 128, "lr": 2e-3},
    # nanoGPT's small CPU run, but with the settings that measured best for 2000 steps (README):
    # weight decay 0, warm-up 300, final learning rate 3e-4 (nanoGPT: 0.1, 100, 1e-4), untied head
    "gpt": {"dataset": "tinyshakespeare", "steps": 2000, "batch_size": 12, "lr": 1e-3, "min_lr": 3e-4,
            "weight_decay": 0.0, "decay_vectors": False, "beta2": 0.99, "warmup_steps": 300, "clip": 1.0,
            "eval_every": 250},
}


def integers(text):
    return [int(part) for part in text.split(",") if part]


def add_train_arguments(parser):
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="mlp")
    parser.add_argument("--dataset", choices=["fashion-mnist", "mnist", "tinyshakespeare"])
    parser.add_argument("--epochs", type=float, help="passes over the training set (image models)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (cosine decay after warm-up)")
    parser.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    parser.add_argument("--warmup", type=int, dest="warmup_steps", help="linear warm-up steps")
    parser.add_argument("--beta2", type=float, help="Adam's second-moment decay")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--clip", type=float, help="global gradient-norm clip (0: off)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default: each epoch)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir", help="folder with the data set's files (else cache, system, download)")
    parser.add_argument("--limit", type=int, help="train on only this many samples (quick runs)")
    parser.add_argument("--out", help="run folder (default runs/<model>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    size = parser.add_argument_group("model size")
    size.add_argument("--hidden", type=integers, help="hidden widths of the dense layers, e.g. 512,256")
    size.add_argument("--channels", type=integers, help="CNN channels, e.g. 32,64")
    size.add_argument("--dropout", type=float)
    size.add_argument("--layers", type=int, help="GPT blocks")
    size.add_argument("--heads", type=int, help="GPT attention heads")
    size.add_argument("--width", type=int, help="GPT embedding width")
    size.add_argument("--context", type=int, help="GPT context length")
    size.add_argument("--tie-weights", action=argparse.BooleanOptionalAction,
                      help="GPT: share the token embedding with the output head (default: no)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="array module: numpy (CPU) or cupy (NVIDIA GPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


MODEL_SIZE_FLAGS = ("hidden", "channels", "dropout", "layers", "heads", "width", "context", "tie_weights")


def config_from(args):
    values = dict(MODEL_DEFAULTS[args.model])
    for name in ("dataset", "epochs", "steps", "batch_size", "lr", "min_lr", "warmup_steps", "beta2", "optimizer",
                 "weight_decay", "clip", "eval_every", "seed", "data_dir", "limit"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    kwargs = {flag: getattr(args, flag) for flag in MODEL_SIZE_FLAGS if getattr(args, flag) is not None}
    return TrainConfig(model=args.model, model_kwargs=kwargs, **values)


def command_train(args):
    backend.tune_cpu()
    backend.use(args.backend)
    if args.resume:
        trainer = Trainer.resume(args.resume, quiet=args.quiet)
        print(f"resuming {args.resume} at step {trainer.step} of {trainer.total_steps}")
    else:
        run_dir = args.out or f"runs/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        trainer = Trainer(config_from(args), run_dir, quiet=args.quiet)
        print(f"training {args.model} on {trainer.config.dataset}: {trainer.total_steps} steps -> {run_dir}")
    started = time.perf_counter()
    trainer.run()
    print(f"{time.perf_counter() - started:.1f} s; checkpoint {trainer.run_dir / CHECKPOINT}")
    if trainer.metrics and trainer.step == trainer.total_steps and "val_accuracy" in trainer.metrics[-1]:
        print(f"evaluate on the test set: mnn test {trainer.run_dir / CHECKPOINT}")
    return 130 if trainer.stop_requested else 0


def command_test(args):
    from .evaluate import test_checkpoint

    report = test_checkpoint(args.checkpoint, args.data_dir)
    print(f"test accuracy {report['test_accuracy']:.4f}  (loss {report['test_loss']:.4f})")
    for name, accuracy in report["per_class"].items():
        print(f"  {name:<12} {accuracy:.4f}")
    print(f"confusion matrix: {report['confusion_png']}")
    return 0


def command_generate(args):
    from .generate import generate_from_checkpoint

    text = generate_from_checkpoint(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    print(text)
    return 0


def command_gradcheck(args):
    from .gradcheck import check_all_layers

    worst = 0.0
    for name, errors in check_all_layers():
        worst = max(worst, *errors.values())
        print(f"{name:<24} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"worst relative error {worst:.1e}")
    return 0 if worst < 1e-6 else 1


def command_bench(bench_args):
    """Hand the arguments to bench/run.py (in the repository, not the installed package)."""
    sys.path.insert(0, str(Path.cwd()))
    try:
        from bench.run import main as bench_main
    except ImportError as error:
        print(f"mnn bench: error: run it from the repository root, with the test extra installed ({error})",
              file=sys.stderr)
        return 2
    return bench_main(bench_args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to bench/run.py
        return command_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="mnn", description="Manual Neural Networks")
    parser.add_argument("--version", action="version", version=f"mnn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(commands.add_parser("train", help="train a model (defaults: MLP on Fashion-MNIST)"))
    test = commands.add_parser("test", help="test accuracy of an image-classifier checkpoint")
    test.add_argument("checkpoint")
    test.add_argument("--data-dir")
    generate = commands.add_parser("generate", help="sample text from a GPT checkpoint")
    generate.add_argument("checkpoint")
    generate.add_argument("--prompt", default="\n")
    generate.add_argument("--tokens", type=int, default=500)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    commands.add_parser("gradcheck", help="finite-difference check of every layer")
    commands.add_parser("bench", help="time mnn against PyTorch (from the repository root; see mnn bench --help)")
    args = parser.parse_args(argv)
    handlers = {"train": command_train, "test": command_test, "generate": command_generate,
                "gradcheck": command_gradcheck}
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as error:  # bad input, missing or unreachable files: no traceback
        print(f"mnn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
