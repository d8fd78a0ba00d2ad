"""What a classifier's checkpoint records about its data (input shape, per-channel normaliser, class
names, the data set's path), every new field checked; checkpoints written before them still load."""
import copy
import dataclasses
import json

import numpy
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

import mnn
from mnn import checkpoint_schema as schema
from mnn import cli
from mnn.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, read_resume_checkpoint
from mnn.train import CHECKPOINT, TrainConfig
from test_data_custom import write_npz

QUICK = ["--limit", "400", "--batch-size", "50", "--hidden", "8", "--quiet"]


def parts(path):
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    return load_safetensors(data), json.loads(header["__metadata__"]["mnn"])


def rewrite(path, change):
    tensors, document = parts(path)
    path.write_bytes(save_safetensors(tensors, metadata={"mnn": json.dumps(change(document))}))
    return path


def as_before(document):
    """The document as mnn wrote it before these fields: no input_shape, no config.data."""
    document.pop("input_shape")
    document["config"].pop("data")
    return document


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mlp"
    assert cli.main(["train", *QUICK, "--steps", "4", "--eval-every", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colour")
    write_npz(folder / "d.npz", numpy.random.default_rng(0))
    run = folder / "run"
    assert cli.main(["train", "--data", str(folder / "d.npz"), "--model", "cnn", "--channels", "2,3", "--hidden",
                     "8", "--steps", "2", "--batch-size", "16", "--quiet", "--out", str(run)]) == 0
    return run


def test_a_fashion_mnist_checkpoint_of_the_earlier_format_loads_tests_and_resumes(fashion_run, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / CHECKPOINT).write_bytes((fashion_run / CHECKPOINT).read_bytes())
    document = parts(rewrite(old / CHECKPOINT, as_before))[1]
    assert "input_shape" not in document and "data" not in document["config"]
    assert sorted(document["config"]) == sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name != "data")
    read_resume_checkpoint(old / CHECKPOINT)
    model = mnn.load(old)
    assert model.input_shape == (1, 28, 28) and model.classes[9] == "Ankle boot"
    assert cli.main(["test", str(old)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(old), "--steps", "6", "--quiet"]) == 0
    resumed = read_checkpoint(old / CHECKPOINT)[1]
    assert resumed["step"] == 6 and resumed["input_shape"] == [1, 28, 28] and resumed["config"]["data"] is None


def test_a_colour_checkpoint_records_its_data(colour_run):
    document = read_resume_checkpoint(colour_run / CHECKPOINT)
    assert document["input_shape"] == [3, 32, 32] and document["classes"] == ["0", "1", "2"]
    assert [len(document["normalizer"][key]) for key in ("mean", "std")] == [3, 3]
    assert document["config"]["dataset"] == "custom" and document["config"]["data"].endswith("d.npz")


BAD_FIELDS = {  # change to a valid colour CNN checkpoint, what the one-line error must name
    "input shape of two numbers": (lambda d: d.update(input_shape=[3, 32]), "input_shape: must hold exactly 3 items"),
    "input shape zero": (lambda d: d.update(input_shape=[0, 32, 32]), "input_shape[0]: must be an integer in [1"),
    "input shape text": (lambda d: d.update(input_shape="3x32x32"), "input_shape: must be a list"),
    "input shape not the model's": (lambda d: d.update(input_shape=[1, 32, 32]),
                                    "input_shape: [1, 32, 32] does not fit a cnn that takes 3 channels of 32 x 32"),
    "means of two channels": (lambda d: d["normalizer"].update(mean=[0.1, 0.2], std=[0.3, 0.3]),
                              "normalizer.mean: 2 channel means do not fit 3 channels"),
    "a mean list and one std": (lambda d: d["normalizer"].update(std=0.3),
                                "normalizer: mean and std must both be numbers or both lists of the same length"),
    "a zero std in the list": (lambda d: d["normalizer"].update(std=[0.3, 0.0, 0.3]),
                               "normalizer.std[1]: must be a finite number >= 1e-06"),
    "a NaN mean in the list": (lambda d: d["normalizer"].update(mean=[0.1, float("nan"), 0.2]),
                               "normalizer.mean[1]: must be a finite number"),
    "an empty mean list": (lambda d: d["normalizer"].update(mean=[], std=[]),
                           "normalizer.mean: must hold at least 1 item, got 0"),
    "a class named twice": (lambda d: d.update(classes=["0", "1", "0"]), "classes: class \"0\" is named more than "
                                                                         "once"),
    "data without custom": (lambda d: d["config"].update(dataset="mnist"),
                            "config.data: names the data set exactly when dataset is custom"),
    "custom without data": (lambda d: d["config"].update(data=None), "config.data: names the data set exactly when"),
    "data a number": (lambda d: d["config"].update(data=5), "config.data: must be a string"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_a_bad_data_field_is_refused_naming_it(colour_run, tmp_path, case):
    change, message = BAD_FIELDS[case]
    path = tmp_path / CHECKPOINT
    path.write_bytes((colour_run / CHECKPOINT).read_bytes())

    def changed(document):
        change(document)
        return document
    rewrite(path, changed)
    for read in (read_resume_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
        assert "\n" not in str(caught.value)


def test_an_input_shape_in_a_text_model_is_refused():
    document = {"mnn_version": "0.1.0", "architecture": {"name": "gpt", "kwargs": {"vocab_size": 5, "context": 4,
                                                                                     "layers": 1, "heads": 1,
                                                                                     "width": 4}},
                "input_shape": [1, 2, 2]}
    with pytest.raises(schema.FieldError, match="input_shape: \\[1, 2, 2\\] does not fit a gpt that takes no images"):
        schema.check_document(copy.deepcopy(document))


def test_an_mlp_input_shape_must_hold_its_inputs():
    document = {"mnn_version": "0.1.0", "architecture": {"name": "mlp", "kwargs": {"in_features": 12, "hidden": [],
                                                                                     "classes": 2}}}
    schema.check_document({**document, "input_shape": [3, 2, 2]})
    with pytest.raises(schema.FieldError, match="input_shape: \\[1, 2, 2\\] does not fit a mlp that takes 12 inputs"):
        schema.check_document({**document, "input_shape": [1, 2, 2]})
    with pytest.raises(schema.FieldError, match="normalizer.mean: 3 channel means do not fit no input_shape"):
        schema.check_document({**document, "config": dataclasses.asdict(TrainConfig()),
                               "normalizer": {"mean": [0.1] * 3, "std": [0.2] * 3}})


def test_a_per_channel_normaliser_is_what_predict_applies(colour_run):
    model = mnn.load(colour_run)
    raw = numpy.load(read_checkpoint(colour_run / CHECKPOINT)[1]["config"]["data"])["x_test"][:4]
    mean, std = (numpy.array(model.normalizer.__dict__[k], numpy.float32)[:, None, None] for k in ("mean", "std"))
    normalised = (raw / numpy.float32(255) - mean) / std
    assert numpy.allclose(model.normalizer(raw), normalised, atol=1e-6)
    logits = model.net(normalised.astype(numpy.float32)).astype(numpy.float64)
    expected = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    numpy.testing.assert_allclose(model.predict_proba(raw), expected / expected.sum(axis=1, keepdims=True),
                                  rtol=1e-5, atol=1e-6)
