"""The LSTM language model: gradients against PyTorch, training and sampling from the command line, resume,
parameter count, and the PyTorch reference run."""
import numpy
import pytest
from reference import adamw_steps_match_torch, whole_model_matches_torch
from test_gpt import SHAKESPEARE
from test_train import assert_resumed_run_equals_uninterrupted_run

import mnn
from mnn import cli, models
from mnn.train import CHECKPOINT

TOL = 1e-6


def small_lstm(dropout=0.0):
    mnn.backend.seed(0)
    return models.lstm(vocab_size=11, context=8, width=5, hidden=[7, 6], dropout=dropout)


def test_the_model_is_embedding_lstm_layers_and_a_head():
    net = models.lstm(vocab_size=11, hidden=[8, 8], dropout=0.1)
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds == ["EmbeddingLayer", "LSTMLayer", "DropoutLayer", "LSTMLayer", "DropoutLayer", "LinearLayer",
                     "CrossEntropyLossLayer"]
    default = models.lstm(vocab_size=11)  # mnn train --model lstm's model
    assert [type(layer).__name__ for layer in default.layers] == [
        "EmbeddingLayer", "LSTMLayer", "LSTMLayer", "LinearLayer", "CrossEntropyLossLayer"]
    assert [(layer.input_size, layer.hidden_size) for layer in default.layers[1:3]] == [(64, 256), (256, 256)]


def test_whole_lstm_gradients_equal_torch(float64, rng):
    assert len(whole_model_matches_torch(small_lstm(), rng, vocab=11, tol=TOL)) == 11


def test_adamw_steps_of_the_whole_lstm_equal_torch(float64, rng):
    adamw_steps_match_torch(small_lstm(), rng, vocab=11)


@pytest.mark.parametrize("kwargs", [{}, {"hidden": [7, 6], "width": 5, "dropout": 0.2}, {"hidden": [3] * 4}])
def test_parameter_count_equals_the_built_networks(kwargs):
    architecture = {"name": "lstm", "kwargs": {"vocab_size": 11, **kwargs}}
    net = models.build(architecture)
    assert models.parameter_count(architecture) == sum(p.size for p in net.params.values())
    assert models.parameter_count(architecture, buffers=True) == sum(v.size for v in net.state_dict().values())


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": []}, "hidden: must hold 1 to 1000 items"),
    ({"hidden": [0]}, "hidden[0]: must be an integer"),
    ({"width": 0}, "width: must be"),
    ({"dropout": 1.0}, "dropout: must be"),
    ({"layers": 2}, "model 'lstm' has no setting layers"),
])
def test_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        models.resolve({"name": "lstm", "kwargs": {"vocab_size": 11, **kwargs}})


TINY_FLAGS = ["--model", "lstm", "--data-dir", str(SHAKESPEARE), "--steps", "4", "--eval-every", "2",
              "--width", "8", "--hidden", "16,12", "--context", "8", "--batch-size", "4", "--quiet"]


def test_cli_trains_an_lstm_then_generates_from_it(tmp_path, capsys):
    run = tmp_path / "lstm"
    assert cli.main(["train", *TINY_FLAGS, "--out", str(run)]) == 0
    assert f"training lstm on {SHAKESPEARE.resolve()}: 4 steps" in capsys.readouterr().out
    net, document = mnn.checkpoint.load_checkpoint(run / CHECKPOINT)
    assert document["architecture"] == {"name": "lstm", "kwargs": {"vocab_size": 65, "context": 8, "width": 8,
                                                                   "hidden": [16, 12], "dropout": 0.0}}
    assert [m["step"] for m in document["metrics"]] == [2, 4] and document["metrics"][-1]["val_loss"] < 4.2
    assert cli.main(["generate", str(run), "--prompt", "ROMEO:", "--tokens", "30", "--top-k", "5"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("ROMEO:") and len(printed.out.rstrip("\n")) >= 36
    assert f"sampling from {run / 'best.safetensors'}\n" in printed.err  # beside the text, not in it
    assert cli.main(["test", str(run)]) == 2
    assert "a text model, not an image classifier: its held-out loss is the val_loss" in capsys.readouterr().err
    assert cli.main(["train", "--model", "lstm", "--heads", "2", "--steps", "1"]) == 2
    assert "--heads is not a setting of the lstm, which takes --hidden, --dropout, --width, --context" in \
        capsys.readouterr().err


def test_a_model_and_a_dataset_that_do_not_fit(capsys):
    assert cli.main(["train", "--model", "lstm", "--dataset", "mnist"]) == 2
    assert ("model 'lstm' trains on tinyshakespeare or text, not 'mnist': choose --model mlp or --model cnn for "
            "images") in capsys.readouterr().err


def tiny_lstm():
    return dict(model="lstm", dataset="tinyshakespeare", data_dir=str(SHAKESPEARE), steps=30, eval_every=10,
                batch_size=4, clip=1.0, model_kwargs={"width": 8, "hidden": [12, 10], "context": 8, "dropout": 0.1})


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    assert_resumed_run_equals_uninterrupted_run(tiny_lstm(), tmp_path)


def test_the_vocabulary_must_fit_the_lstm_and_class_names_are_refused():
    from mnn.checkpoint_schema import FieldError, check_task_fits_model
    architecture = {"name": "lstm", "kwargs": {"vocab_size": 3}}
    check_task_fits_model({"architecture": architecture, "vocab": "abc"})
    with pytest.raises(FieldError, match="4 characters do not fit vocab_size = 3"):
        check_task_fits_model({"architecture": architecture, "vocab": "abcd"})
    with pytest.raises(FieldError, match="2 class names do not fit a lstm"):
        check_task_fits_model({"architecture": architecture, "classes": ["a", "b"]})


def test_the_torch_reference_trains_the_same_run(tmp_path):
    """bench/lstm_reference.py runs end to end; in float64, from the same weights on the same batches, mnn's
    and torch's validation losses agree to many digits after a few AdamW steps with clipping."""
    from bench.lstm_reference import compare, report
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])
    flags = ["--data-dir", str(text), "--steps", "6", "--eval-every", "3", "--width", "8", "--hidden", "16,12",
             "--context", "8", "--batch-size", "4", "--clip", "0.5", "--warmup", "2"]
    result = compare(flags, dtype="float64", threads=1, log=lambda line: None)
    assert result["steps"] == [3, 6] and len(result["mnn_val_loss"]) == len(result["torch_val_loss"]) == 2
    assert result["mnn_val_loss"][-1] < result["mnn_val_loss"][0] < 4.2  # it learns
    assert result["max_difference"] <= 1e-9 and result["within_tolerance"]
    assert result["mnn_ms_per_step"] > 0 and result["torch_ms_per_step"] > 0
    assert "| 6 |" in report(result) and mnn.backend.default_dtype() is numpy.float32


@pytest.mark.parametrize("argument, message", [
    ({"tokens": -1}, "tokens must be an integer >= 0, got -1"), ({"tokens": True}, "tokens must be an integer"),
    ({"top_k": -2}, "top_k must be an integer >= 0"), ({"top_k": 2.5}, "top_k must be an integer >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": "0.5"}, "temperature must be a finite number >= 0"), ({"seed": -1}, "seed must be an integer"),
    ({"context": 0}, "context must be an integer > 0"),
    ({"prompt": 5}, "prompt must be a string or None, got int")])
def test_generate_from_python_checks_what_the_command_line_checks(argument, message):
    from mnn.data.text import CharTokenizer
    from mnn.generate import generate
    with pytest.raises((TypeError, ValueError), match=rf"^generate: {message}"):
        generate(small_lstm(), CharTokenizer.from_text("abcdefghijk"), **{"prompt": "ab", "tokens": 3,
                                                                            "context": 8, **argument})


@pytest.mark.parametrize("training", [True, False])
def test_sampling_and_evaluating_leave_the_network_in_the_mode_they_found(training):
    from mnn.data.text import CharTokenizer
    from mnn.generate import generate
    from mnn.tasks import chunk_sums
    net = small_lstm(dropout=0.5).train(training)
    generate(net, CharTokenizer.from_text("abcdefghijk"), "ab", tokens=2, context=8)
    assert net.training is training and all(layer.training is training for layer in net.layers)
    chunk_sums(net, 4, 2, lambda start, end: numpy.ones(1), 1)
    assert net.training is training and all(layer.training is training for layer in net.layers)
