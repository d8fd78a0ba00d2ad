"""The command line: every bad flag is one line on stderr, nothing is lost, a stop saves once."""
import json
import os
import signal

import numpy
import pytest
from threadpoolctl import threadpool_info

from mnn import backend, cli
from mnn.checkpoint import read_checkpoint
from mnn.train import CHECKPOINT, TrainConfig, Trainer

QUICK = ["--limit", "400", "--batch-size", "50", "--hidden", "8", "--quiet"]

BAD_FLAGS = [
    ("train", "--batch-size", "0"), ("train", "--batch-size", "x"), ("train", "--hidden", "0"),
    ("train", "--hidden", ","), ("train", "--hidden", "64,abc"), ("train", "--channels", "8,-1"),
    ("train", "--context", "0"), ("train", "--width", "0"), ("train", "--layers", "0"), ("train", "--heads", "-2"),
    ("train", "--epochs", "inf"), ("train", "--epochs", "nan"), ("train", "--epochs", "0"), ("train", "--epochs", "-1"),
    ("train", "--steps", "-5"), ("train", "--steps", "0"), ("train", "--steps", "2.5"),
    ("train", "--lr", "nan"), ("train", "--lr", "inf"), ("train", "--lr", "0"), ("train", "--lr", "-1"),
    ("train", "--min-lr", "-1"), ("train", "--clip", "-1"), ("train", "--beta2", "-1"), ("train", "--beta2", "1"),
    ("train", "--warmup", "-5"), ("train", "--weight-decay", "-10"), ("train", "--weight-decay", "nan"),
    ("train", "--eval-every", "-1"), ("train", "--eval-every", "0"), ("train", "--limit", "-5"),
    ("train", "--limit", "0"), ("train", "--dropout", "1"), ("train", "--dropout", "-0.1"), ("train", "--seed", "-1"),
    ("train", "--threads", "0"), ("generate", "--tokens", "-5"), ("generate", "--top-k", "-1"),
    ("generate", "--temperature", "-1"), ("generate", "--temperature", "nan"), ("generate", "--seed", "x"),
    ("test", "--threads", "-1"),
]


@pytest.mark.parametrize("command,flag,value", BAD_FLAGS)
def test_a_bad_flag_value_is_one_line_on_stderr(command, flag, value, capsys):
    positional = [] if command == "train" else ["somewhere"]
    with pytest.raises(SystemExit) as stopped:
        cli.main([command, *positional, flag, value])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: must " in err and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 exceeds the peak learning rate"),
    (["--model", "cnn", "--channels", "4,4,4,4,4,4"], "image"),
    (["--model", "gpt", "--width", "10", "--heads", "4", "--steps", "2"], "10 is not divisible by heads = 4"),
])
def test_settings_that_cannot_work_are_refused(flags, message, tmp_path, capsys):
    assert cli.main(["train", *flags, "--limit", "200", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_cupy_without_cupy_names_a_working_install(monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    assert cli.main(["train", "--backend", "cupy", "--steps", "1"]) == 2
    assert "pip install -e '.[gpu]'" in capsys.readouterr().err
    backend.use("numpy")


def test_any_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise KeyError("somewhere deep")

    monkeypatch.setattr(cli, "command_gradcheck", broken)
    assert cli.main(["gradcheck"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError" in err and "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["gradcheck", "--debug"])
    monkeypatch.setenv("MNN_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["gradcheck"])


def test_an_earlier_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    before = (run / CHECKPOINT).read_bytes()
    assert cli.main(["train", *QUICK, "--steps", "3", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err and (run / CHECKPOINT).read_bytes() == before
    assert cli.main(["train", *QUICK, "--steps", "3", "--out", str(run), "--overwrite"]) == 0
    assert read_checkpoint(run / CHECKPOINT)[1]["step"] == 3


def test_resume_refuses_settings_it_would_ignore_and_extends_with_steps(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "6", "--eval-every", "3", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--lr", "5", "--batch-size", "7"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size, --lr cannot change when resuming" in err
    assert cli.main(["train", "--resume", str(run / CHECKPOINT), "--quiet"]) == 0
    assert "has finished: step 6 of 6" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(run), "--steps", "9", "--quiet"]) == 0
    document = read_checkpoint(run / CHECKPOINT)[1]
    assert document["step"] == 9 and [m["step"] for m in document["metrics"]] == [3, 6, 9]


def test_sigterm_saves_like_ctrl_c_and_a_stop_at_an_evaluation_saves_once(tmp_path, monkeypatch):
    config = TrainConfig(limit=400, batch_size=50, steps=12, eval_every=4, model_kwargs={"hidden": [8]})
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    saves, original_step, original_save = [], trainer.train_step, trainer.save

    def step_then_terminate(bar):
        original_step(bar)
        if trainer.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "train_step", step_then_terminate)
    monkeypatch.setattr(trainer, "save", lambda: saves.append(trainer.step) or original_save())
    trainer.run()
    assert trainer.stop_requested and read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 8
    assert saves == [4, 8]  # the evaluation at step 8 was abandoned; one save at the stop
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    resumed = Trainer.resume(tmp_path / "run", quiet=True)
    resumed.run()
    straight = Trainer(config, tmp_path / "straight", quiet=True)
    straight.run()
    assert resumed.metrics == straight.metrics  # the abandoned evaluation was redone on resume
    for name, value in straight.net.state_dict().items():
        assert numpy.array_equal(resumed.net.state_dict()[name], value), name


def test_a_stop_after_the_last_evaluation_leaves_a_finished_run(tmp_path, monkeypatch, capsys):
    """Nothing was left to do: the run says it finished (exit code 0), not that it can be continued."""
    run = tmp_path / "run"
    original_evaluate = Trainer.evaluate

    def evaluate_then_terminate(trainer, bar):
        original_evaluate(trainer, bar)
        if trainer.step == trainer.total_steps:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_terminate)
    assert cli.main(["train", *QUICK, "--steps", "4", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" not in out and "evaluate on the test set" in out
    assert read_checkpoint(run / CHECKPOINT)[1]["step"] == 4


def test_a_stop_abandons_the_evaluation_in_flight(tmp_path):
    config = TrainConfig(limit=400, batch_size=50, steps=2, model_kwargs={"hidden": [8]})
    task = Trainer(config, tmp_path / "run", quiet=True).task
    net = Trainer(config, tmp_path / "run", quiet=True).net
    assert task.evaluate(net, stop=lambda: True) is None
    assert set(task.evaluate(net, stop=lambda: False)) == {"val_loss", "val_accuracy"}


def test_test_prints_the_accuracy_when_the_picture_cannot_be_written(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    import mnn.evaluate

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mnn.evaluate, "plot_confusion", read_only)
    capsys.readouterr()
    assert cli.main(["test", str(run)]) == 0  # the run folder is accepted for its checkpoint
    out = capsys.readouterr().out
    assert "test accuracy" in out and "confusion matrix not written" in out and "Permission denied" in out
    report = json.loads((run / "test.json").read_text())
    assert "numbers: " + str(run / "test.json") in out and 0 <= report["test_accuracy"] <= 1
    assert sum(map(sum, report["confusion"])) == 10000


def test_metrics_are_written_whole(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "4", "--eval-every", "2", "--out", str(run)]) == 0
    assert [m["step"] for m in json.loads((run / "metrics.json").read_text())] == [2, 4]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def blas_threads():
    return {entry["num_threads"] for entry in threadpool_info() if entry["user_api"] == "blas"}


def test_threads_follow_the_flag_then_the_environment_then_the_affinity(monkeypatch):
    for name in backend.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert backend.cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert backend.cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")
    assert backend.cpu_threads() == 3 and backend.cpu_threads(2) == 2
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        backend.cpu_threads(0)
    previous = blas_threads()
    try:
        backend.tune_cpu(1)
        assert blas_threads() == {1}
    finally:
        backend.tune_cpu(max(previous))


def test_gradcheck_prints_pass_or_fail_per_layer_and_fails_on_a_wrong_one(monkeypatch, capsys):
    import mnn.gradcheck
    monkeypatch.setattr(mnn.gradcheck, "check_all_layers",
                        lambda: iter([("GoodLayer", {"input0": 1e-10, "w (accumulated)": 0.0}),
                                      ("WrongLayer", {"input0": 1e-10, "w": 0.3})]))
    assert cli.main(["gradcheck"]) == 1
    out = capsys.readouterr().out
    assert "below 1e-06" in out and "PASS  GoodLayer" in out and "FAIL  WrongLayer" in out
    assert "GoodLayer                input0 1.0e-10  (+= 0.0e+00)" in out
    assert "1 layers failed: WrongLayer" in out


@pytest.mark.parametrize("flags", [["--seed", "0"], ["--clip", "0"], ["--no-tie-weights"], ["--dropout", "0"],
                                   ["--overwrite"], ["--warmup", "0"]])
def test_resume_refuses_every_other_flag_even_at_a_false_or_zero_value(flags, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    before = (run / CHECKPOINT).read_bytes()
    assert cli.main(["train", "--resume", str(run), *flags]) == 2
    assert f"{flags[0].replace('--no-', '--')} cannot change when resuming" in capsys.readouterr().err
    assert (run / CHECKPOINT).read_bytes() == before


def write_image(path, rng):
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=numpy.uint8)).save(path)


def train_on_cats_and_dogs(data, run):
    """Two steps of an MLP on ``data/cat`` and ``data/dog``, 12 random 8 x 8 grey images each."""
    rng = numpy.random.default_rng(0)
    for label in ("cat", "dog"):
        (data / label).mkdir(parents=True)
        for index in range(12):
            write_image(data / label / f"{index:02}.png", rng)
    assert cli.main(["train", "--data", str(data), "--steps", "2", "--batch-size", "8", "--hidden", "8",
                     "--out", str(run), "--quiet"]) == 0


def test_a_run_whose_data_moved_resumes_from_its_new_place_if_it_is_the_same_data(tmp_path, capsys):
    run = tmp_path / "run"
    train_on_cats_and_dogs(tmp_path / "data", run)
    (tmp_path / "data").rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "4"]) == 2
    assert f"if the data moved, give its new place: mnn train --resume {run} --data PATH" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--steps", "4", "--data", str(tmp_path / "moved"),
                     "--data-dir", str(tmp_path)]) == 2
    assert "--data and --data-dir both name where the run's data now is" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(run), "--steps", "4", "--data", str(tmp_path / "moved"), "--quiet"]) == 0
    assert read_checkpoint(run / CHECKPOINT)[1]["config"]["data"] == str(tmp_path / "moved")  # the next resume's
    write_image(tmp_path / "moved" / "cat" / "00.png", numpy.random.default_rng(1))
    assert cli.main(["train", "--resume", str(run), "--steps", "6"]) == 2  # other pixels in one image
    assert "the data changed since the run began" in capsys.readouterr().err


def test_resume_takes_the_run_folder_or_its_checkpoint_only(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run / "metrics.json")]) == 2
    assert "--resume takes a run folder or the checkpoint.safetensors in it" in capsys.readouterr().err
    for empty in (["--resume", ""], ["--out", " "]):
        with pytest.raises(SystemExit):
            cli.main(["train", *empty])
        assert "must not be empty" in capsys.readouterr().err


def test_flags_that_would_be_ignored_are_refused_or_honoured(tmp_path, capsys):
    assert cli.main(["train", *QUICK, "--optimizer", "sgd", "--beta2", "0.9", "--out", str(tmp_path / "a")]) == 2
    assert "--optimizer sgd has none" in capsys.readouterr().err
    assert cli.main(["train", *QUICK, "--steps", "5", "--warmup", "5", "--out", str(tmp_path / "b")]) == 2
    assert "--warmup 5 leaves no step after the warm-up" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--epochs", "0.001", "--layers", "1", "--width", "8", "--heads", "1",
                     "--context", "8", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert "training gpt on tinyshakespeare: 11 steps" in capsys.readouterr().out  # 0.001 x 10,457; not 2000


def test_a_tiny_temperature_is_nearly_greedy_not_an_error():
    from mnn.generate import next_token_probabilities
    logits = numpy.array([1.0, 3.0, 2.0])
    assert numpy.array_equal(next_token_probabilities(logits, 5e-324, 0), [0.0, 1.0, 0.0])
    assert numpy.array_equal(next_token_probabilities(logits, 0, 0), [0.0, 1.0, 0.0])


def test_patience_stops_early_and_best_keeps_the_best(tmp_path, monkeypatch, capsys):
    config = TrainConfig(limit=400, batch_size=50, steps=40, eval_every=2, patience=2, model_kwargs={"hidden": [8]})
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    scores = iter([0.5, 0.6, 0.55, 0.6, 0.7])  # the best, 0.6 at step 4, is not beaten at steps 6 and 8
    monkeypatch.setattr(trainer.task, "evaluate", lambda net, stop, ranks: {"val_loss": 1.0, "val_accuracy": next(scores)})
    trainer.run()
    assert trainer.step == 8 and trainer.out_of_patience()
    assert read_checkpoint(tmp_path / "run" / "best.safetensors")[1]["step"] == 4
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 8
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert "stopped early at step 8" in capsys.readouterr().out
    assert cli.main(["test", str(tmp_path / "run")]) == 0
    assert str(tmp_path / "run" / "best.safetensors") in capsys.readouterr().out


def test_a_resumed_run_refuses_data_that_changed(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh\n" * 300)
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "gpt", "--data-dir", str(text), "--steps", "4", "--layers", "1", "--width",
                     "8", "--heads", "1", "--context", "8", "--out", str(run), "--quiet"]) == 0
    text.write_text("abcdefgX\n" * 300)  # as many characters, another vocabulary
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "8"]) == 2
    assert "vocab: the data changed since the run began" in capsys.readouterr().err
    text.write_text("abcdefgh\n" * 299 + "hgfedcba\n")  # the same vocabulary, other text
    assert cli.main(["train", "--resume", str(run), "--steps", "8"]) == 2
    assert "data_sha256: the data changed since the run began" in capsys.readouterr().err
    text.write_text("abcdefgh\n" * 300)  # as it was
    assert cli.main(["train", "--resume", str(run), "--steps", "8", "--quiet"]) == 0


def test_a_resumed_run_refuses_an_image_that_changed_class(tmp_path, capsys):
    """Classes, normaliser and input shape stay; one image moved to the other class folder does not."""
    run = tmp_path / "run"
    train_on_cats_and_dogs(tmp_path / "data", run)
    (tmp_path / "data" / "cat" / "11.png").rename(tmp_path / "data" / "dog" / "0.png")  # same order, other label
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--steps", "4"]) == 2
    assert "data_sha256: the data changed since the run began" in capsys.readouterr().err


def test_a_stop_in_the_last_evaluation_is_redone_on_resume(tmp_path, monkeypatch):
    config = TrainConfig(limit=400, batch_size=50, steps=4, eval_every=2, model_kwargs={"hidden": [8]})
    trainer = Trainer(config, tmp_path / "run", quiet=True)
    original = trainer.task.evaluate

    def stopped_in_the_last(net, stop, ranks):
        if trainer.step == 4:
            trainer.request_stop(None, None)
        return original(net, stop, ranks)

    monkeypatch.setattr(trainer.task, "evaluate", stopped_in_the_last)
    trainer.run()
    assert [m["step"] for m in trainer.metrics] == [2]
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert [m["step"] for m in read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["metrics"]] == [2, 4]


def test_overwrite_leaves_nothing_of_the_replaced_run(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    assert (run / "best.safetensors").exists()
    assert cli.main(["test", str(run)]) == 0 and (run / "test.json").exists()
    interrupted = [*QUICK, "--steps", "20", "--eval-every", "10", "--out", str(run), "--overwrite"]
    original = Trainer.train_step

    def stop_at_once(self, bar):
        original(self, bar)
        self.request_stop(None, None)

    import unittest.mock
    with unittest.mock.patch.object(Trainer, "train_step", stop_at_once):
        assert cli.main(["train", *interrupted]) == 130
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "metrics.json"]


def test_mnn_test_clears_what_a_killed_mnn_test_left(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    left = [run / ".confusion.png.k1ll3d.tmp", run / ".test.json.k1ll3d.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    assert cli.main(["test", str(run)]) == 0
    assert not any(path.exists() for path in left) and (run / "confusion.png").exists()


@pytest.mark.parametrize("model,sizes", [("gpt", ["--layers", "1", "--width", "8", "--heads", "1"]),
                                         ("lstm", ["--hidden", "8", "--width", "8"])])
def test_a_text_model_trains_on_any_utf8_file_given_with_data(model, sizes, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    run = tmp_path / "run"
    assert cli.main(["train", "--model", model, "--data", str(text), "--steps", "2", "--context", "8", *sizes,
                     "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"training {model} on {text}" in out and f"mnn generate {run} --tokens 500 --top-k 20\n" in out
    assert read_checkpoint(run / CHECKPOINT)[1]["config"]["dataset"] == "text"
    assert cli.main(["generate", str(run), "--prompt", "the ", "--tokens", "5"]) == 0


def test_a_relative_data_dir_text_without_newlines_resumes_and_generates_from_anywhere(tmp_path, capsys, monkeypatch):
    (tmp_path / "words.txt").write_text("abcde " * 400)  # no newline: the default prompt falls back to ' '
    monkeypatch.chdir(tmp_path)
    flags = ["--layers", "1", "--width", "8", "--heads", "1", "--context", "8", "--quiet"]
    assert cli.main(["train", "--model", "gpt", "--data-dir", "words.txt", "--steps", "2", "--out", "run",
                     *flags]) == 0
    out = capsys.readouterr().out
    assert f"training gpt on {tmp_path / 'words.txt'}:" in out
    assert "sample from it: mnn generate run --tokens 500 --top-k 20\n" in out  # no ROMEO: outside its vocabulary
    monkeypatch.chdir("/")
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "3", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", str(tmp_path / "run"), "--tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(" ") and set(text.strip("\n")) <= set("abcde ")


def test_an_out_that_is_a_file_or_cannot_be_written_fails_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    assert cli.main(["train", "--limit", "300", "--steps", "2", "--out", str(tmp_path / "afile"), "--quiet"]) == 2
    assert "afile: a file, not a folder" in capsys.readouterr().err
    assert cli.main(["train", "--limit", "300", "--steps", "2", "--out", str(tmp_path / "afile"), "--overwrite"]) == 2
    assert "afile: a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"
    assert cli.main(["train", "--limit", "300", "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0

    def refused(*args, **kwargs):  # as a read-only folder does (the tests may run as root, whom no mode stops)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("mnn.runs.tempfile.TemporaryFile", refused)
    monkeypatch.setattr("mnn.train.Trainer.train_step", lambda *args: pytest.fail("trained before the check"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "4", "--quiet"]) == 2
    assert "run: the run's files cannot be written there (Permission denied)" in capsys.readouterr().err


def test_a_resume_that_would_end_before_the_step_reached_says_so(tmp_path, capsys):
    assert cli.main(["train", "--limit", "300", "--steps", "4", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "2", "--quiet"]) == 2
    assert "--steps 2 ends the run at step 2, but it has reached step 4 already: give a later end" in \
        capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "predict"])
def test_help_shows_defaults_only_where_there_is_one(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    shown = {"generate": "(default: 0.8)", "predict": "(default: 3)"}[command]
    assert shown in text


def test_the_best_of_equal_accuracies_is_the_one_with_the_lower_loss(tmp_path):
    trainer = Trainer(TrainConfig(limit=400, batch_size=50, steps=4, model_kwargs={"hidden": [8]}), tmp_path / "r",
                      quiet=True)
    scores = [(0.9, 0.2), (1.0, 0.5), (1.0, 0.1), (1.0, 0.1)]
    trainer.metrics = [{"step": step, "val_accuracy": accuracy, "val_loss": loss}
                       for step, (accuracy, loss) in enumerate(scores, 1)]
    assert trainer.best_evaluation() == 2  # the first of the truly equal


def test_an_unknown_flag_is_told_by_its_subcommand(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--bogus"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "mnn train: error: unrecognized arguments: --bogus (the flags: mnn train --help)\n"


@pytest.mark.parametrize("variable", ["PMI_RANK", "OMPI_COMM_WORLD_RANK"])
def test_under_mpiexec_a_bad_flag_is_told_by_rank_0_alone(variable, capsys, monkeypatch):
    for rank, told in (("1", ""), ("0", "mnn train: error: unrecognized arguments: --bogus")):
        monkeypatch.setenv(variable, rank)
        with pytest.raises(SystemExit) as stopped:
            cli.main(["train", "--bogus"])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and (err.startswith(told) if told else err == "")


def test_a_default_warm_up_takes_at_most_a_quarter_of_a_short_run(tmp_path):
    from test_gpt import SHAKESPEARE
    flags = ["train", "--model", "gpt", "--data", str(SHAKESPEARE), "--steps", "40", "--eval-every", "40",
             "--layers", "1", "--width", "8", "--heads", "1", "--context", "8", "--quiet"]
    assert cli.main([*flags, "--out", str(tmp_path / "default")]) == 0
    document = read_checkpoint(tmp_path / "default" / CHECKPOINT)[1]
    assert document["config"]["warmup_steps"] == 10 and document["metrics"][-1]["lr"] < 1e-3  # it decayed
    assert cli.main([*flags, "--warmup", "30", "--out", str(tmp_path / "given")]) == 0
    assert read_checkpoint(tmp_path / "given" / CHECKPOINT)[1]["config"]["warmup_steps"] == 30  # as asked


def test_a_second_train_on_a_run_in_progress_is_refused_and_deletes_nothing(tmp_path, capsys):
    """The run's own process holds its folder: a --resume or an --overwrite meanwhile would remove its files."""
    from mnn.runs import LOCK, held_run_folder

    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    files = sorted(path.name for path in run.iterdir())
    stale = run / f".{CHECKPOINT}.in-flight.tmp"
    with held_run_folder(run):  # as the process training it holds it
        stale.write_bytes(b"being written")
        resume = ["--resume", str(run), "--steps", "4"]
        overwrite = [*QUICK, "--steps", "3", "--out", str(run), "--overwrite"]
        for flags in (resume, overwrite):
            capsys.readouterr()
            assert cli.main(["train", *flags]) == 2
            err = capsys.readouterr().err
            assert "another `mnn train` is training this run now" in err and len(err.strip().splitlines()) == 1
        assert stale.exists() and sorted(path.name for path in run.iterdir()) == sorted(files + [LOCK, stale.name])
    assert not (run / LOCK).exists()
    assert cli.main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 0
    assert read_checkpoint(run / CHECKPOINT)[1]["step"] == 4 and not stale.exists()


def test_a_folder_with_any_file_of_a_run_is_not_taken_for_a_new_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    (run / CHECKPOINT).unlink()  # best.safetensors, metrics.json and curves.png stay
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (best.safetensors" in err and "--resume" not in err


def test_a_new_run_that_fails_before_saving_leaves_no_folder(tmp_path, capsys):
    """Neither the run's folder nor the parents it made; a folder that was there stays, with what it holds."""
    run = tmp_path / "new" / "run"
    assert cli.main(["train", *QUICK, "--lr", "1e30", "--steps", "3", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "FloatingPointError" not in err and len(err.strip().splitlines()) == 1
    assert only_files(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert cli.main(["train", *QUICK, "--lr", "1e30", "--steps", "3", "--out", str(tmp_path / "mine" / "a" / "b")]) == 2
    assert only_files(tmp_path) == ["mine"] and only_files(tmp_path / "mine") == ["notes.txt"]


def only_files(folder):
    return sorted(path.name for path in folder.iterdir())


def test_a_run_folder_on_a_file_system_without_locks_trains_unlocked(tmp_path, monkeypatch):
    """Lustre without its flock option answers ENOSYS: the run goes on, as it would without the lock."""
    import errno
    import fcntl

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 2


def test_a_finished_run_in_a_folder_that_cannot_be_written_still_says_so(tmp_path, monkeypatch, capsys):
    import mnn.runs

    run = tmp_path / "run"
    assert cli.main(["train", *QUICK, "--steps", "2", "--out", str(run)]) == 0
    real_open = os.open

    def read_only(path, flags, *args):  # as a read-only mount answers (the tests run as root, above permissions)
        if str(path).endswith(mnn.runs.LOCK):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args)
    monkeypatch.setattr(mnn.runs.os, "open", read_only)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert "has finished: step 2 of 2" in capsys.readouterr().out


@pytest.mark.parametrize("model, lr", [("gpt", "1e-4"), ("lstm", "5e-5")])
def test_a_peak_rate_below_the_models_default_end_rate_decays_to_it(model, lr, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 40)
    run = tmp_path / "run"
    sizes = ["--context", "8", "--width", "8"] + (["--layers", "1"] if model == "gpt" else ["--hidden", "8"])
    assert cli.main(["train", "--model", model, "--data", str(text), *sizes, "--lr", lr, "--steps", "2",
                     "--batch-size", "2", "--quiet", "--out", str(run)]) == 0
    config = read_checkpoint(run / CHECKPOINT)[1]["config"]
    assert config["lr"] == config["min_lr"] == float(lr)


def test_epochs_beyond_any_run_are_refused_where_the_flag_is_parsed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "1e308"])
    assert "argument --epochs: must lie in (0, 1e+06]" in capsys.readouterr().err
    config = TrainConfig(limit=400, batch_size=50, epochs=1e308, model_kwargs={"hidden": [8]})
    with pytest.raises(ValueError, match=r"TrainConfig.epochs: must be a finite number > 0 and <= 1000000"):
        Trainer(config, "never-written")  # the Python API too: no checkpoint it writes may be refused on loading


def test_a_printed_command_quotes_its_paths_and_a_tilde_after_the_equals_sign_is_home(tmp_path, capsys, monkeypatch):
    """--out=~/runs/x: the shell leaves that ~ alone, and mnn made a folder named '~'. The commands printed
    to paste (mnn test RUN) quote a path with a space, which pasted unquoted was two arguments."""
    import shlex

    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.main(["train", "--limit", "300", "--epochs", "1", "--out=~/my runs/a", "--quiet"]) == 0
    run = tmp_path / "my runs" / "a"
    assert (run / "checkpoint.safetensors").exists()
    printed = capsys.readouterr().out
    assert f"mnn test {shlex.quote(str(run))}" in printed
    assert cli.main(shlex.split(printed.split("evaluate on the test set: ")[1])[1:]) == 0
