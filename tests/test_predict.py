"""mnn.load and mnn predict: a trained model used on raw images and text."""
import json

import numpy
import pytest
from PIL import Image

import mnn
from mnn import cli
from mnn.data.images import load_images
from mnn.tasks import classify

QUICK = ["--limit", "400", "--batch-size", "50", "--hidden", "8", "--quiet"]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mlp"
    assert cli.main(["train", *QUICK, "--steps", "8", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def test_images():
    dataset = load_images("fashion-mnist", "test")
    return dataset.images[:50], dataset.labels[:50]


def test_load_takes_a_run_folder_or_its_checkpoint(mlp_run):
    by_folder, by_file = mnn.load(mlp_run), mnn.load(mlp_run / "checkpoint.safetensors")
    assert by_folder.classes == by_file.classes and by_folder.classes[9] == "Ankle boot"
    assert by_folder.input_shape == (1, 28, 28) and not by_folder.net.training


def test_predictions_on_raw_pixels_are_the_networks_on_normalised_ones(mlp_run, test_images):
    model = mnn.load(mlp_run)
    images, labels = test_images
    probabilities = model.predict_proba(images)
    assert probabilities.shape == (50, 10) and numpy.allclose(probabilities.sum(axis=1), 1)
    _, _, expected = classify(model.net, model.normalizer(images), labels)
    assert numpy.array_equal(model.predict(images), expected)
    assert numpy.array_equal(model.predict(images[:, 0]), expected)  # grey images may leave out the channel
    assert model.predict(images[3, 0]).tolist() == [expected[3]]  # one image


def test_images_from_files_and_arrays(mlp_run, test_images, tmp_path, capsys):
    model = mnn.load(mlp_run)
    images, _ = test_images
    Image.fromarray(images[0, 0]).save(tmp_path / "first.png")
    Image.fromarray(numpy.repeat(images[1, 0, :, :, None], 3, axis=2)).resize((56, 56)).save(tmp_path / "big.jpg")
    numpy.save(tmp_path / "batch.npy", images[2:5])
    assert numpy.allclose(model.predict_proba([tmp_path / "first.png"]), model.predict_proba(images[:1]))
    from_files = model.predict_proba([str(tmp_path / "first.png"), tmp_path / "batch.npy"])  # as mnn predict takes
    assert numpy.allclose(from_files, model.predict_proba(images[[0, 2, 3, 4]]))
    assert cli.main(["predict", str(mlp_run), str(tmp_path / "first.png"), str(tmp_path / "big.jpg"),
                     str(tmp_path / "batch.npy"), "--json", "--top", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results][:2] == [str(tmp_path / "first.png"), str(tmp_path / "big.jpg")]
    assert len(results) == 5 and all(len(r["top"]) == 2 for r in results)
    top = results[0]["top"][0]
    assert top["class"] == model.classes[top["index"]] and top["index"] == model.predict(images[0])[0]
    assert cli.main(["predict", str(mlp_run), str(tmp_path / "first.png")]) == 0
    assert "first.png: " in capsys.readouterr().out


def test_a_sixteen_bit_image_is_read_as_its_eight_bit_pixels(mlp_run, test_images, tmp_path):
    model = mnn.load(mlp_run)
    images, _ = test_images
    Image.fromarray(images[0, 0].astype(numpy.uint16) * 257).save(tmp_path / "deep.png")  # 255 -> 65535
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert numpy.array_equal(model.predict_proba([tmp_path / "deep.png"]), model.predict_proba(images[:1]))


def huge_png_header(path):
    """A PNG that says it is 20,000 x 10,000 pixels (Pillow refuses more than 179 M at opening), no pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b""))
    return path


@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "missing.png", "missing.png"),
    (lambda tmp: (tmp / "text.png").write_text("not an image") and tmp / "text.png", "not an image that can be read"),
    (lambda tmp: (tmp / "notes.txt").write_text("x") and tmp / "notes.txt", "expected an image"),
    (lambda tmp: numpy.save(tmp / "wrong.npy", numpy.zeros((2, 3, 28, 28))) or tmp / "wrong.npy", "takes (1, 28, 28)"),
    (lambda tmp: numpy.save(tmp / "neg.npy", -numpy.ones((28, 28))) or tmp / "neg.npy", "raw pixel values in [0, 255]"),
    (lambda tmp: numpy.save(tmp / "one.npy", numpy.array(3.0)) or tmp / "one.npy", "one.npy: images of shape ();"),
    (lambda tmp: numpy.save(tmp / "text.npy", numpy.array(["a"])) or tmp / "text.npy", "text.npy: images must be raw"),
    (lambda tmp: numpy.save(tmp / "none.npy", numpy.zeros((0, 28, 28))) or tmp / "none.npy", "none.npy: no images"),
    (lambda tmp: numpy.save(tmp / "cut.npy", numpy.zeros((28, 28))) or (tmp / "cut.npy").write_bytes(
        (tmp / "cut.npy").read_bytes()[:300]) and tmp / "cut.npy", "cut.npy: Failed to read all data"),
    (lambda tmp: (tmp / "noise.npy").write_bytes(bytes(range(256))) and tmp / "noise.npy",
     "noise.npy: not a .npy array (numpy.save writes one): its first bytes are not NumPy's format"),
    (lambda tmp: tmp, "a folder, not a file"),
    (lambda tmp: huge_png_header(tmp / "huge.png"), "huge.png: not an image that can be read (Image size (200000000"),
])
def test_predict_bad_inputs_are_one_line(mlp_run, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert cli.main(["predict", str(mlp_run), str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_text_model_generates_as_mnn_generate_does(tmp_path, capsys):
    run = tmp_path / "gpt"
    assert cli.main(["train", "--model", "gpt", "--steps", "3", "--layers", "1", "--width", "16", "--heads", "2",
                     "--context", "8", "--out", str(run), "--quiet"]) == 0
    model = mnn.load(run)
    text = model.generate("ROMEO:", tokens=20, top_k=5, seed=3)
    capsys.readouterr()
    assert cli.main(["generate", str(run), "--prompt", "ROMEO:", "--tokens", "20", "--top-k", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == text + "\n"
    greedy = model.generate("ROMEO:", tokens=10, temperature=0)
    assert greedy == model.generate("ROMEO:", tokens=10, temperature=0, seed=99)  # no randomness left
    assert cli.main(["predict", str(run), "x.png"]) == 2
    assert "not an image classifier" in capsys.readouterr().err


def test_a_fifo_is_refused_not_read(mlp_run, tmp_path, capsys):
    import os
    for name in ("pipe.png", "pipe.npy"):
        os.mkfifo(tmp_path / name)
        assert cli.main(["predict", str(mlp_run), str(tmp_path / name)]) == 2
        assert "not a regular file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a regular file"):
        mnn.load(mlp_run).predict([tmp_path / "pipe.png"])


def test_a_checkpoint_without_class_names_predicts_numbered_classes(mlp_run, test_images, tmp_path, capsys):
    """Older files hold no names; ``mnn test`` reads them, and so must ``predict``."""
    from test_checkpoint_hostile import parts, written
    tensors, document = parts(mlp_run / "best.safetensors")
    del document["classes"]
    old = written(tmp_path / "old.safetensors", tensors, document)
    images, _ = test_images
    model = mnn.load(old)
    assert model.classes == [str(i) for i in range(10)]
    assert numpy.array_equal(model.predict(images), mnn.load(mlp_run).predict(images))
    numpy.save(tmp_path / "x.npy", images[:1])
    assert cli.main(["predict", str(old), str(tmp_path / "x.npy")]) == 0
    assert f"x.npy: {model.predict(images[:1])[0]} " in capsys.readouterr().out


def test_a_model_of_four_channels_asks_for_arrays_not_image_files(tmp_path):
    from mnn.predict import read_image
    Image.fromarray(numpy.zeros((12, 12, 3), numpy.uint8)).save(tmp_path / "dog.png")
    with pytest.raises(ValueError, match=r"dog.png: an image file gives grey or RGB pixels, and the model takes 4 "
                                         r"channels: give them as a .npy array \(4, 12, 12\)"):
        read_image(tmp_path / "dog.png", (4, 12, 12))
