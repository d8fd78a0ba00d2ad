"""The ``mnn`` command: train, test, generate, predict, gradcheck, bench.

Only light modules are imported here; NumPy, the layers and the trainer are imported
inside ``main``, where a Ctrl-C while they load ends in one line, not a traceback.
"""
import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .arguments import count, integer, non_negative, path_argument, positive_int
from .runs import checkpoint_file
from .train_command import add_train_arguments, command_train

def add_common_arguments(parser):
    parser.add_argument("--threads", type=integer(1, 1024), help="CPU threads (default: the first of $OMP_NUM_THREADS, "
                        "$OPENBLAS_NUM_THREADS and $MKL_NUM_THREADS that is set, else the cores this process may use)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error ($MNN_DEBUG=1 too)")



GRADCHECK_TOLERANCE = 1e-6
# An error every rank meets is told once, by rank 0, whose abort (FORWARD_DELAY_S after it prints) ends
# the others while they wait RANK_ERROR_DELAY_S: this holds while rank 0 trails by less than 2.5 s.
RANK_ERROR_DELAY_S = 3  # how long a rank other than 0 waits before telling its error (see main)
FORWARD_DELAY_S = 0.5  # time for mpiexec to pass on what a rank printed before MPI_Abort ends it


def command_test(args):
    from .evaluate import test_checkpoint

    if args.data is not None and args.data_dir is not None:
        raise ValueError("--data names your own test images; --data-dir a built-in data set's folder: give one")
    path = checkpoint_file(args.checkpoint)
    report = test_checkpoint(path, args.data_dir, data=args.data)
    print(f"{path}\ntest accuracy {report['test_accuracy']:.4f}  (loss {report['test_loss']:.4f})")
    for name, accuracy in report["per_class"].items():
        print(f"  {name:<12} {'no test images' if accuracy is None else f'{accuracy:.4f}'}")
    print("\n".join(report["written"]))
    return 0


def command_generate(args):
    from .generate import generate_from_checkpoint

    def stream(text):
        print(text, end="", flush=True)

    path = checkpoint_file(args.checkpoint)
    print(f"sampling from {path}", file=sys.stderr)  # which of a run's checkpoints; the text alone goes to stdout
    generate_from_checkpoint(path, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, on_text=stream)
    print()
    return 0


def command_predict(args):
    import json

    from .predict import Classifier, load, read_inputs

    model = load(args.checkpoint)
    if not isinstance(model, Classifier):
        raise ValueError(f"{model.path}: not an image classifier; sample from a text model with mnn generate")
    names, images = read_inputs(args.files, model.input_shape)
    probabilities = model.predict_proba(images)
    top = numpy_top(probabilities, args.top)
    if args.json:
        print(json.dumps([{"file": name, "top": [{"class": model.classes[k], "index": int(k), "probability": float(p)}
                                                 for k, p in ranked]} for name, ranked in zip(names, top)], indent=1))
        return 0
    print(f"{model.path}")
    for name, ranked in zip(names, top):
        print(f"{name}: " + ", ".join(f"{model.classes[k]} {p:.3f}" for k, p in ranked))
    return 0


def numpy_top(probabilities, k):
    """Per row, the k (class index, probability) pairs of highest probability, highest first."""
    order = probabilities.argsort(axis=1)[:, ::-1][:, :k]
    return [[(int(i), float(row[i])) for i in ranks] for row, ranks in zip(probabilities, order)]


def command_gradcheck(args):
    from .gradcheck import ACCUMULATED, check_all_layers

    print(f"finite differences in float64; a layer passes when every error (relative to the gradient's scale: "
          f"mnn.gradcheck) is below {GRADCHECK_TOLERANCE:g}")
    failed = []
    for name, errors in check_all_layers():
        passed = max(errors.values()) < GRADCHECK_TOLERANCE
        failed += [] if passed else [name]
        derivatives = {k: v for k, v in errors.items() if not k.endswith(ACCUMULATED)}
        adds = [v for k, v in errors.items() if k.endswith(ACCUMULATED)]  # backward's +=, one number
        print(f"{'PASS' if passed else 'FAIL'}  {name:<24} " + "  ".join(f"{k} {v:.1e}" for k, v in derivatives.items())
              + (f"  (+= {max(adds):.1e})" if adds else ""))
    print(f"{len(failed)} layers failed: {', '.join(failed)}" if failed else "all layers passed")
    return 1 if failed else 0


def command_bench(bench_args):
    """Hand the arguments to bench/run.py (in the repository, not the installed package)."""
    sys.path.insert(0, str(Path.cwd()))
    try:
        from bench.run import main as bench_main
    except ImportError as error:
        if {"-h", "--help"} & set(bench_args):  # what it is, even where it cannot run
            print("usage: mnn bench [options of python -m bench]\n\nTimes training steps of mnn and PyTorch side "
                  "by side. It runs from a clone of mnn's repository (its bench/ folder), with the test extra "
                  "installed (PyTorch): cd mnn && mnn bench --help")
            return 0
        print(f"mnn bench: error: run it from the repository root, with the test extra installed ({error})",
              file=sys.stderr)
        return 2
    try:
        return bench_main(bench_args, prog="mnn bench")
    except Exception as error:  # as main() does for the other commands
        if os.environ.get("MNN_DEBUG", "") not in ("", "0"):
            raise
        print(f"mnn bench: error: {describe(error)}", file=sys.stderr)
        return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to bench/run.py
        return command_bench(argv[1:])
    main_parser = parser()
    args, unknown = main_parser.parse_known_args(argv)
    if unknown:  # told by the subcommand, whose --help lists its flags
        main_parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = args.debug or os.environ.get("MNN_DEBUG", "") not in ("", "0")
    from .distributed import launched_rank, world_size

    if args.command != "train" and world_size() > 1:  # each rank would print it all, and race on its files
        if launched_rank() == 0:
            print_error(f"mnn {args.command}: runs in one process; run it without mpiexec (mnn train alone "
                        "trains on several)")
        return 2
    handlers = {"train": command_train, "test": command_test, "generate": command_generate, "predict": command_predict,
                "gradcheck": command_gradcheck}
    try:
        from . import backend, kernels

        kernels.mode()  # a bad MNN_KERNELS is told now, before a run folder is made
        backend.tune_cpu(args.threads)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print_error(f"mnn {args.command}: interrupted")
        return stop_other_ranks(130)
    except BrokenPipeError:  # mnn generate | head: the reader has what it wanted (mnn train prints on, nowhere)
        from .files import silence_stdout

        silence_stdout()
        return stop_other_ranks(0)
    except Exception as error:  # anything that reaches here gets one line, unless --debug asks for more
        ranks = other_ranks()
        if debug and ranks is None:
            raise
        if ranks is not None and not ranks.is_root:
            # An error every rank meets (a bad argument, a missing file) is told once: rank 0 tells it and
            # ends the job while the others wait here. An error of this rank alone is told after the wait.
            time.sleep(RANK_ERROR_DELAY_S)
        if debug:
            traceback.print_exc()
        else:
            print_error(f"mnn {args.command}{f' ({ranks})' if ranks else ''}: error: {describe(error)}")
        return stop_other_ranks(2)


def other_ranks():
    """The ranks this process trains with under mpiexec, if there are others; else None."""
    distributed = sys.modules.get("mnn.distributed")
    return distributed.connected() if distributed else None


def stop_other_ranks(code):
    """After an error: under mpiexec, end every rank (the others may be waiting for this one)."""
    ranks = other_ranks()
    if ranks is not None:
        # mpiexec forwards a rank's output through a pipe; an abort that comes first can lose it.
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(FORWARD_DELAY_S)
        ranks.abort(code)
    return code


def print_error(text):
    """``text`` on standard error, if it is there to take it (closed, or its reader gone: nothing to tell)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            print(text, file=sys.stderr)


def describe(error):
    """One line for an error: the message, with its type where the type says what went wrong."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.errno is not None and error.strerror:  # not "[Errno 28] ..."
        files = [str(name) for name in (error.filename, error.filename2) if name is not None]
        text = error.strerror + (f": {' -> '.join(files)}" if files else "")
    if isinstance(error, (ValueError, OSError, RuntimeError, TypeError, FloatingPointError)):
        return text
    return f"{type(error).__name__}: {text} (run again with --debug for the traceback)"


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr, saying where the flags are listed, not the usage text first."""

    def error(self, message):
        from .distributed import launched_rank

        if launched_rank():  # under mpiexec every rank parses the same flags: rank 0 alone tells
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (the flags: {self.prog} --help)\n")


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, where it has one to show (not None, False or empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "" or \
                action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser():
    main_parser = OneLineErrors(prog="mnn", description="Manual Neural Networks")
    main_parser.add_argument("--version", action="version", version=f"mnn {__version__}")
    commands = main_parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model (defaults: MLP on Fashion-MNIST)")
    add_train_arguments(train)
    add_common_arguments(train)
    test = commands.add_parser("test", help="test accuracy of an image-classifier checkpoint")
    test.add_argument("checkpoint", type=path_argument, help="a run folder or its checkpoint file")
    test.add_argument("--data-dir", type=path_argument, help="folder with the built-in data set's files")
    test.add_argument("--data", type=path_argument, metavar="PATH",
                      help="test on these images (a folder of class folders, an .npz's x_test and y_test, or a "
                      ".csv), labels matched to the model's classes by name")
    add_common_arguments(test)
    generate = commands.add_parser("generate", help="sample text from a GPT or LSTM checkpoint",
                                   formatter_class=DefaultsShown)
    generate.add_argument("checkpoint", type=path_argument, help="a run folder or its checkpoint file")
    generate.add_argument("--prompt", help="text to continue (default: a newline, or the vocabulary's first "
                          "character where the text had none)")
    generate.add_argument("--tokens", type=count, default=500, help="characters to sample")
    generate.add_argument("--temperature", type=non_negative, default=0.8, help="0: always the likeliest")
    generate.add_argument("--top-k", type=count, default=0, help="sample among the k likeliest (0: all)")
    generate.add_argument("--seed", type=count, default=0, help="the same seed gives the same text")
    add_common_arguments(generate)
    predict = commands.add_parser("predict", help="classify image files or .npy arrays with a trained model",
                                  formatter_class=DefaultsShown)
    predict.add_argument("checkpoint", type=path_argument, help="a run folder or its checkpoint file")
    predict.add_argument("files", nargs="+", metavar="FILE", help="PNG/JPEG images (resized and converted to the "
                         "model's input) or .npy arrays of raw pixels (0-255)")
    predict.add_argument("--top", type=positive_int, default=3, help="classes to show per image")
    predict.add_argument("--json", action="store_true", help="print JSON, for scripts")
    add_common_arguments(predict)
    add_common_arguments(commands.add_parser("gradcheck", help="finite-difference check of every layer"))
    commands.add_parser("bench", help="time mnn against PyTorch (from the repository root; see mnn bench --help)")
    main_parser.subcommands = commands.choices  # name -> parser: where a subcommand's unknown flag is told
    return main_parser


def run_command():
    """The ``mnn`` command: ``main()``, then exit. Once it has returned (a stopped run has saved),
    a late Ctrl-C while Python shuts down must not turn the exit into a traceback."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run_command()
