"""The trainer and the command line, on real Fashion-MNIST."""
import sys

import numpy
import pytest

from mnn import cli
from mnn.checkpoint import read_checkpoint
from mnn.train import CHECKPOINT, TrainConfig, Trainer

TINY = dict(limit=2000, batch_size=100, epochs=2, model_kwargs={"hidden": [32], "dropout": 0.1})


def interrupt_at(trainer, step):
    """Make ``trainer`` receive Ctrl-C right after ``step`` steps."""
    original = trainer.train_step

    def step_then_interrupt(bar):
        original(bar)
        if trainer.step == step:
            trainer.request_stop(None, None)

    trainer.train_step = step_then_interrupt
    return trainer


TINY_CNN = dict(limit=400, batch_size=50, epochs=2, model="cnn", model_kwargs={"channels": [2, 3], "hidden": [8]})


def tiny_gpt():
    from test_gpt import SHAKESPEARE
    return dict(model="gpt", dataset="tinyshakespeare", data_dir=str(SHAKESPEARE), steps=40, eval_every=20,
                batch_size=4, clip=1.0, model_kwargs={"layers": 1, "heads": 2, "width": 16, "context": 8,
                                                      "dropout": 0.1})


@pytest.mark.parametrize("settings", [TINY, TINY_CNN, "gpt"], ids=["mlp", "cnn", "gpt"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, settings):
    assert_resumed_run_equals_uninterrupted_run(tiny_gpt() if settings == "gpt" else settings, tmp_path)


def assert_resumed_run_equals_uninterrupted_run(settings, tmp_path):
    """Stopped after step 13 and resumed, a run ends with the weights and metrics of one never stopped."""
    straight = Trainer(TrainConfig(**settings), tmp_path / "straight", quiet=True)
    straight.run()
    interrupt_at(Trainer(TrainConfig(**settings), tmp_path / "split", quiet=True), 13).run()
    assert read_checkpoint(tmp_path / "split" / CHECKPOINT)[1]["step"] == 13
    resumed = Trainer.resume(tmp_path / "split", quiet=True)
    assert resumed.step == 13 and resumed.total_steps == straight.total_steps
    resumed.run()
    for name, value in straight.net.state_dict().items():
        assert numpy.array_equal(resumed.net.state_dict()[name], value), name
    assert resumed.metrics == straight.metrics


def test_ctrl_c_saves_a_checkpoint_after_a_whole_step(tmp_path):
    trainer = interrupt_at(Trainer(TrainConfig(**TINY), tmp_path / "run", quiet=True), 7)
    trainer.run()
    _, meta = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert meta["step"] == 7 and trainer.stop_requested


@pytest.mark.slow
def test_short_real_run_reaches_a_stated_accuracy(tmp_path):
    """Two epochs on 20,000 Fashion-MNIST images: >= 0.83 on the held-out validation split."""
    trainer = Trainer(TrainConfig(limit=20000, epochs=2, model_kwargs={"hidden": [256]}), tmp_path, quiet=True)
    metrics = trainer.run()
    assert metrics[-1]["val_accuracy"] >= 0.83, metrics[-1]


def test_cli_train_then_test(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", "--limit", "1000", "--epochs", "1", "--batch-size", "50", "--hidden", "16",
                     "--out", str(run), "--quiet"])
    assert code == 0
    assert {"checkpoint.safetensors", "metrics.json", "curves.png"} <= {p.name for p in run.iterdir()}
    assert cli.main(["test", str(run / CHECKPOINT)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "Ankle boot" in out and (run / "confusion.png").is_file()


def test_cli_reports_bad_input(tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04junk")
    assert cli.main(["test", str(tmp_path / "x.safetensors")]) == 2
    assert "pickle" in capsys.readouterr().err


def test_cli_gradcheck_covers_every_layer(capsys):
    import mnn
    assert cli.main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    for name in set(mnn.layers.__all__) - {"Layer", "LossLayer", "CompositeLayer"}:
        assert name in out, name


def test_cli_generate_from_a_tiny_gpt_run(tmp_path, capsys):
    from test_gpt import SHAKESPEARE
    run = tmp_path / "gpt"
    assert cli.main(["train", "--model", "gpt", "--data-dir", str(SHAKESPEARE), "--steps", "3", "--eval-every", "3",
                     "--layers", "1", "--width", "16", "--heads", "2", "--context", "8", "--out", str(run),
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", str(run / CHECKPOINT), "--prompt", "ROMEO:", "--tokens", "30", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= 36
    assert cli.main(["generate", str(run / CHECKPOINT), "--prompt", "~@"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err


def test_ctrl_c_on_the_command_line_saves_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    command = [sys.executable, "-m", "mnn.cli", "train", "--limit", "2000", "--epochs", "200", "--batch-size", "20",
               "--hidden", "8", "--out", str(run), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("training mlp")
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted: checkpoint saved at step" in out
    step = read_checkpoint(run / CHECKPOINT)[1]["step"]
    assert 0 < step < 20000
    resumed = Trainer.resume(run, quiet=True)
    assert resumed.step == step


@pytest.mark.parametrize("interrupt", [False, True], ids=["trains-on", "ctrl-c"])
def test_a_reader_of_the_progress_that_goes_away_stops_nothing(tmp_path, interrupt):
    """mnn train 2>&1 | head -1: the progress bar's writes to a pipe whose reader left raised, and the run
    stopped, said 0, and lost what it trained since its last checkpoint. It trains on (and a Ctrl-C then
    still saves the step reached and says 130)."""
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    steps = 200000 if interrupt else 60
    command = [sys.executable, "-m", "mnn.cli", "train", "--limit", "2000", "--steps", str(steps), "--batch-size", "20",
               "--hidden", "8", "--eval-every", "1000000", "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout.readline().startswith("training mlp")
    process.stdout.close()  # the reader goes away: head -1
    if interrupt:
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == (130 if interrupt else 0)
    step = read_checkpoint(run / CHECKPOINT)[1]["step"]
    assert 0 < step < steps if interrupt else step == steps


def test_progress_output_that_cannot_be_written_goes_quiet(monkeypatch):
    from mnn.files import Progress

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        flush = write

    monkeypatch.setattr(sys, "stderr", Gone())
    progress = Progress()
    assert progress.write("12%") == 3 and progress.stream is None
    progress.flush()
    monkeypatch.setattr(sys, "stderr", None)  # started with standard error closed (2>&-)
    assert Progress().write("x") == 1 and not Progress().isatty()


def test_a_message_during_training_clears_the_progress_bar_first(monkeypatch):
    """tqdm clears its bar before a message where the bar's stream is sys.stderr: Progress, which wraps it,
    must count as it, or each epoch's line is printed on the end of the bar."""
    import io

    from tqdm import tqdm

    from mnn.files import Progress

    terminal = io.StringIO()  # stdout and stderr on one terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    with tqdm(total=3, file=Progress(), mininterval=0, ascii=False) as bar:
        bar.update(1)
        bar.write("step 1 epoch 1")
    assert "\rstep 1 epoch 1\n" in terminal.getvalue() and "%|" in terminal.getvalue()


def test_a_model_and_a_dataset_that_do_not_fit(capsys):
    assert cli.main(["train", "--model", "cnn", "--dataset", "tinyshakespeare"]) == 2
    assert ("model 'cnn' trains on fashion-mnist, mnist, cifar10 or your own images (--data), not 'tinyshakespeare':"
            " choose --model gpt or --model lstm for text" in capsys.readouterr().err)


def test_a_size_flag_the_model_does_not_take(capsys):
    assert cli.main(["train", "--layers", "3", "--limit", "500"]) == 2
    assert "--layers is not a setting of the mlp, which takes --hidden, --dropout" in capsys.readouterr().err


def diverging_trainer(tmp_path, at_step, breaks, settings=TINY):
    """A tiny run in which ``breaks(trainer)`` makes the numbers overflow once ``at_step`` steps are done."""
    trainer = Trainer(TrainConfig(**{**settings, "eval_every": 5, "steps": 20}), tmp_path / "run", quiet=True)
    original = trainer.train_step

    def step_then_break(bar):
        original(bar)
        if trainer.step == at_step:
            breaks(trainer)

    trainer.train_step = step_then_break
    return trainer


def test_an_overflowed_optimizer_state_ends_the_run_before_a_checkpoint_holds_it(tmp_path):
    """Adam's squared gradients can overflow while the weights stay finite: no loader would take that back."""
    def overflow(trainer):
        next(iter(trainer.optimizer.buffers.values()))[0] = numpy.inf
    trainer = diverging_trainer(tmp_path, 10, overflow)
    with pytest.raises(FloatingPointError, match=r"AdamW's \S+ holds NaN or infinity at step 10: training "
                                                 r"diverged; start a new run with a lower --lr; the checkpoint of "
                                                 r"step 5 is kept"):
        trainer.run()
    _, document = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert document["step"] == 5  # still loads


def test_an_overflowed_running_variance_ends_the_run_too(tmp_path):
    """In evaluation 1 / sqrt(inf) is 0: the losses stay finite, but no loader takes the buffer back."""
    def overflow(trainer):
        trainer.net.state_dict()["2.running_var"][0] = numpy.inf
    with pytest.raises(FloatingPointError, match=r"^2.running_var holds NaN or infinity at step 10"):
        diverging_trainer(tmp_path, 10, overflow, TINY_CNN).run()
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 5


def test_a_validation_loss_that_overflowed_is_neither_recorded_nor_the_best(tmp_path):
    def overflow(trainer):
        trainer.net.params["4.b"][0] = numpy.nan
    trainer = diverging_trainer(tmp_path, 10, overflow)
    with pytest.raises(FloatingPointError, match=r"the validation loss became nan at step 10: training diverged"):
        trainer.run()
    assert [record["step"] for record in trainer.metrics] == [5]
    assert read_checkpoint(tmp_path / "run" / "best.safetensors")[1]["step"] == 5


def test_a_bad_kernel_mode_is_told_before_a_run_folder_is_made(tmp_path, capsys, monkeypatch):
    from mnn import kernels
    monkeypatch.setitem(kernels._state, "mode", None)
    monkeypatch.setenv("MNN_KERNELS", "NUMPY")
    assert cli.main(["train", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert "kernels: unknown mode 'NUMPY'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_a_reader_that_goes_away_neither_stops_training_nor_fails_generate(tmp_path, unbuffered):
    """mnn train | true: the run goes on and saves; mnn generate | head -c 1: it stops, quietly. Python
    buffers a pipe's output unless told not to: the pipe then breaks at a flush, or at the exit."""
    import json
    import os
    import subprocess
    import sys

    from test_gpt import SHAKESPEARE

    def close_at_once(command):
        environment = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
        process = subprocess.Popen([sys.executable, "-m", "mnn", *command], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=environment)
        process.stdout.close()  # as a reader that wants nothing, or has what it wanted, does
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0 and b"Error" not in err and b"error" not in err, err

    run = tmp_path / "gpt"
    close_at_once(["train", "--model", "gpt", "--data", str(SHAKESPEARE), "--steps", "120", "--eval-every", "5",
                   "--layers", "1", "--width", "8", "--heads", "1", "--context", "8", "--quiet", "--out", str(run)])
    assert [record["step"] for record in json.loads((run / "metrics.json").read_text())][-1] == 120
    close_at_once(["generate", str(run), "--tokens", "100000"])


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, r"TrainConfig.batch_size: must be an integer >= 1"),
    ({"limit": 20.0}, r"TrainConfig.limit: must be an integer"),
    ({"seed": -1}, r"TrainConfig.seed: must be an integer >= 0"),
    ({"dataset": "custom"}, r"TrainConfig.data: names the data set exactly when dataset is custom"),
    ({"model_kwargs": {"hidden": [8], "classes": 20}}, r"TrainConfig.model_kwargs.classes = 20: the data decides "
                                                       r"it, 10; leave it out"),
])
def test_a_config_the_python_api_gets_wrong_is_refused_by_field_before_anything_runs(changes, message, tmp_path):
    """A setting no checkpoint loader would take back never trains: with the field's name, not a NumPy error."""
    with pytest.raises(ValueError, match=message):
        Trainer(TrainConfig(**{**TINY, **changes}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_in_float16_is_refused_saying_why(tmp_path):
    from mnn import backend
    backend.set_default_dtype(numpy.float16)
    try:
        with pytest.raises(ValueError, match=r"training needs float32 or float64 parameters: in float16, Adam's eps"):
            Trainer(TrainConfig(**TINY), tmp_path / "run")
    finally:
        backend.set_default_dtype(numpy.float32)


def test_resume_takes_epochs_given_as_they_are(tmp_path):
    Trainer(TrainConfig(**{**TINY, "steps": 4, "eval_every": 4}), tmp_path / "run").run()
    with pytest.raises(ValueError, match=r"TrainConfig.epochs: must be a finite number > 0"):
        Trainer.resume(tmp_path / "run", quiet=True, epochs=0)  # not read as "not given", which meant 2 epochs
