"""Your own data set (``mnn train --data``): image folders, .npz and .csv files the tests write,
trained on end to end and tested with ``mnn test``; every bad input refused in one line naming the file."""
import io
import json

import numpy
import pytest
from PIL import Image

import mnn
from mnn import cli
from mnn.checkpoint import read_checkpoint
from mnn.data.custom import label_indices, load_custom, read_image_folder
from mnn.data.images import Normalizer, channel_statistics, load_images
from mnn.tasks import ImageClassification, validation_size
from mnn.train import CHECKPOINT

NAMES = ["cat", "dog", "emu"]


def synthetic(rng, count, shape=(3, 32, 32), classes=3):
    """Raw uint8 images whose class brightens one channel (or, for grey images, one band of rows)."""
    labels = rng.integers(0, classes, count)
    labels[:classes] = numpy.arange(classes)  # every class present
    images = rng.integers(0, 120, (count, *shape)).astype(numpy.uint8)
    for index, label in enumerate(labels):
        if shape[0] >= classes:
            images[index, label] += 100
        else:
            band = shape[1] // classes
            images[index, :, label * band:(label + 1) * band] += 100
    return images, labels


def write_npz(path, rng, shape=(3, 32, 32), train=60, test=20, names=None, **replaced):
    x_train, y_train = synthetic(rng, train, shape)
    x_test, y_test = synthetic(rng, test, shape)
    if names is not None:
        y_train, y_test = numpy.array(names)[y_train], numpy.array(names)[y_test]
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, **replaced}
    numpy.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return arrays


def write_folder(folder, rng, shape=(3, 32, 32), count=60, names=NAMES):
    """``folder/<class>/<n>.png``: RGB, or grey where ``shape`` has one channel."""
    images, labels = synthetic(rng, count, shape, len(names))
    for index, (image, label) in enumerate(zip(images, labels)):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
        pixels = image[0] if shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / names[label] / f"{index:03d}.png")
    return images, labels


def write_csv(path, rng, count=60, side=28, names=("a", "b", "c"), label_last=False):
    """A Kaggle-style CSV: a header, then the label and side * side grey pixels a row."""
    images, labels = synthetic(rng, count, (1, side, side), len(names))
    pixels = [f"pixel{i}" for i in range(1, side * side + 1)]
    header = [*pixels, "label"] if label_last else ["label", *pixels]
    lines = [",".join(header)]
    for image, label in zip(images, labels):
        values = list(map(str, image.reshape(-1)))
        lines.append(",".join([*values, str(names[label])] if label_last else [str(names[label]), *values]))
    path.write_text("\n".join(lines) + "\n")
    return images, labels


QUICK = ["--steps", "3", "--batch-size", "16", "--hidden", "8", "--quiet"]
CNN = ["--model", "cnn", "--channels", "2,3"]


def train(data, run, *flags):
    return cli.main(["train", "--data", str(data), *QUICK, *flags, "--out", str(run)])


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- each form end to end: mnn train --data, then mnn test --------------------------
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_an_npz_of_colour_images_trains_and_tests_on_its_own_test_split(tmp_path, rng, capsys, model):
    write_npz(tmp_path / "rgb.npz", rng)
    run = tmp_path / "run"
    assert train(tmp_path / "rgb.npz", run, "--limit", "40", *(CNN if model == "cnn" else ["--model", "mlp"])) == 0
    out = capsys.readouterr().out
    assert f"training {model} on {tmp_path / 'rgb.npz'}" in out and f"mnn test {run}\n" in out
    document = read_checkpoint(run / CHECKPOINT)[1]
    assert document["input_shape"] == [3, 32, 32] and document["classes"] == ["0", "1", "2"]
    assert document["config"]["dataset"] == "custom" and document["config"]["data"] == str(tmp_path / "rgb.npz")
    assert len(document["normalizer"]["mean"]) == 3 and len(document["normalizer"]["std"]) == 3
    kwargs = document["architecture"]["kwargs"]
    assert kwargs["classes"] == 3 and (kwargs["in_features"] == 3 * 32 * 32 if model == "mlp" else
                                       (kwargs["in_channels"], kwargs["image_size"]) == (3, 32))
    assert cli.main(["test", str(run)]) == 0
    report = json.loads((run / "test.json").read_text())
    assert sum(map(sum, report["confusion"])) == 20 and list(report["per_class"]) == ["0", "1", "2"]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_an_image_folder_of_colour_images_trains_and_tests_on_another_folder(tmp_path, rng, capsys, model):
    write_folder(tmp_path / "train", rng)
    images, labels = write_folder(tmp_path / "test", rng, count=24)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image: skipped")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "train" / "dog" / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS metadata: skipped
    run = tmp_path / "run"
    assert train(tmp_path / "train", run, "--limit", "40", *(CNN if model == "cnn" else [])) == 0
    assert f"mnn test {run} --data HELD_OUT_IMAGES" in capsys.readouterr().out
    document = read_checkpoint(run / CHECKPOINT)[1]
    assert document["classes"] == NAMES and document["input_shape"] == [3, 32, 32]
    assert cli.main(["test", str(run)]) == 2
    assert "holds no test split" in one_line_error(capsys)
    assert cli.main(["test", str(run), "--data", str(tmp_path / "train")]) == 2
    assert f"{tmp_path / 'train'} is the data set {run / 'best.safetensors'} trained on" in one_line_error(capsys)
    assert cli.main(["test", str(run), "--data", str(tmp_path / "test")]) == 0
    report = json.loads((run / "test.json").read_text())
    assert numpy.array(report["confusion"]).sum(axis=1).tolist() == numpy.bincount(labels, minlength=3).tolist()
    model_loaded = mnn.load(run)  # mnn predict reads the same images
    file = tmp_path / "test" / NAMES[labels[0]] / "000.png"
    assert numpy.allclose(model_loaded.predict_proba([file]), model_loaded.predict_proba(images[:1]))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_csv_with_named_labels_trains_and_tests_on_another_csv(tmp_path, rng, capsys, model):
    write_csv(tmp_path / "train.csv", rng)
    _, labels = write_csv(tmp_path / "test.csv", rng, count=15, label_last=True)  # the label column found by name
    run = tmp_path / "run"
    assert train(tmp_path / "train.csv", run, "--limit", "40", *(CNN if model == "cnn" else [])) == 0
    document = read_checkpoint(run / CHECKPOINT)[1]
    assert document["classes"] == ["a", "b", "c"] and document["input_shape"] == [1, 28, 28]
    assert type(document["normalizer"]["mean"]) is float  # grey images: one mean and one deviation, as before
    assert cli.main(["test", str(run), "--data", str(tmp_path / "test.csv")]) == 0
    report = json.loads((run / "test.json").read_text())
    assert numpy.array(report["confusion"]).sum(axis=1).tolist() == numpy.bincount(labels, minlength=3).tolist()


def test_a_custom_run_resumes_from_its_checkpoint(tmp_path, rng):
    write_npz(tmp_path / "d.npz", rng)
    assert train(tmp_path / "d.npz", tmp_path / "run") == 0
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--steps", "5", "--quiet"]) == 0
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["step"] == 5


def test_a_relative_data_path_is_recorded_whole(tmp_path, rng, monkeypatch):
    write_npz(tmp_path / "d.npz", rng)
    monkeypatch.chdir(tmp_path)
    assert train("d.npz", tmp_path / "run") == 0
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)[1]["config"]["data"] == str(tmp_path / "d.npz")
    monkeypatch.chdir("/")
    assert cli.main(["test", str(tmp_path / "run")]) == 0


def test_non_square_images_train_the_mlp_and_are_refused_by_the_cnn(tmp_path, rng, capsys):
    write_npz(tmp_path / "wide.npz", rng, shape=(3, 8, 12))
    assert train(tmp_path / "wide.npz", tmp_path / "mlp") == 0
    assert read_checkpoint(tmp_path / "mlp" / CHECKPOINT)[1]["input_shape"] == [3, 8, 12]
    assert cli.main(["test", str(tmp_path / "mlp")]) == 0
    capsys.readouterr()
    assert train(tmp_path / "wide.npz", tmp_path / "cnn", *CNN) == 2
    assert "images of 12 x 8 pixels; the CNN takes square images" in one_line_error(capsys)


def test_grey_npz_images_without_a_channel_axis(tmp_path, rng):
    arrays = write_npz(tmp_path / "grey.npz", rng, shape=(1, 10, 10))
    numpy.savez(tmp_path / "grey.npz", **{k: v[:, 0] if k.startswith("x") else v for k, v in arrays.items()})
    dataset = load_custom(tmp_path / "grey.npz")
    assert dataset.images.shape == (60, 1, 10, 10) and numpy.array_equal(dataset.images, arrays["x_train"])


def test_float_pixels_stay_floats_and_whole_numbers_become_bytes(tmp_path, rng):
    x, y = synthetic(rng, 30, (3, 4, 4))
    numpy.savez(tmp_path / "f.npz", x_train=x / 255.0, y_train=y)
    assert load_custom(tmp_path / "f.npz").images.dtype == numpy.float32
    numpy.savez(tmp_path / "w.npz", x_train=x.astype(numpy.float64), y_train=y.astype(numpy.int32))
    loaded = load_custom(tmp_path / "w.npz")
    assert loaded.images.dtype == numpy.uint8 and numpy.array_equal(loaded.images, x)


# -- labels --------------------------------------------------------------------
def test_integer_labels_0_to_k_stay_themselves():
    indices, classes = label_indices(numpy.array([2, 0, 1, 2]), "somewhere")
    assert indices.tolist() == [2, 0, 1, 2] and classes == ["0", "1", "2"]


def test_other_integer_labels_are_sorted_by_value_and_keep_their_names():
    indices, classes = label_indices(numpy.array([10, 2, -1, 10]), "somewhere")
    assert classes == ["-1", "2", "10"] and indices.tolist() == [2, 1, 0, 2]


def test_string_labels_are_sorted_and_mapped_by_name_at_test_time():
    indices, classes = label_indices(numpy.array(["dog", "cat", "dog"]), "somewhere")
    assert classes == ["cat", "dog"] and indices.tolist() == [1, 0, 1]
    mapped, same = label_indices(numpy.array(["emu", "cat"]), "t", classes=["cat", "dog", "emu"])
    assert mapped.tolist() == [2, 0] and same == ["cat", "dog", "emu"]
    with pytest.raises(ValueError, match=r"^t: label 'yak' is not one of the model's 3 classes \('cat', 'dog', "
                                         r"'emu'\) \(1 such labels\)$"):
        label_indices(numpy.array(["cat", "yak"]), "t", classes=["cat", "dog", "emu"])


def test_labels_that_name_classes_are_classes_even_where_some_classes_are_words():
    """Classes 1, 2 and cat: a test split of 1s and 2s is those classes, not indices 1 and 2 (2 and cat)."""
    mapped, _ = label_indices(numpy.array([1, 2, 1]), "t", classes=["1", "2", "cat"])
    assert mapped.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"t: label '0' is not one of the model's 3 classes \('1', '2', 'cat'\)"):
        label_indices(numpy.array([0, 1]), "t", classes=["1", "2", "cat"])  # 0 names no class: which 1 is meant?


def test_integer_labels_are_indices_for_a_model_with_named_classes():
    """A Fashion-MNIST model's classes are words: a test set's labels 0-9 are their indices."""
    mapped, _ = label_indices(numpy.array([9, 0]), "t", classes=["T-shirt/top", *"bcdefghi", "Ankle boot"])
    assert mapped.tolist() == [9, 0]
    with pytest.raises(ValueError, match="label '10' is not one of the class indices 0 to 9"):
        label_indices(numpy.array([10]), "t", classes=list("abcdefghij"))
    by_name, _ = label_indices(numpy.array([7, 3]), "t", classes=["3", "7"])  # integer names: matched by name
    assert by_name.tolist() == [1, 0]
    folders, _ = label_indices(numpy.array(["9", "0"]), "t", classes=["T-shirt/top", *"bcdefghi", "Ankle boot"],
                               noun="class folder")  # "T-shirt/top" cannot name a folder: 0 does
    assert folders.tolist() == [9, 0]
    with pytest.raises(ValueError, match=r"class folder '0' is not one of the model's 10 classes .* \(2 such"):
        label_indices(numpy.array(["0", "cat"]), "t", classes=list("abcdefghij"), noun="class folder")  # all or none


def test_a_test_split_with_a_label_training_never_saw_is_refused(tmp_path, rng, capsys):
    arrays = write_npz(tmp_path / "d.npz", rng)
    arrays["y_test"][4] = 7
    numpy.savez(tmp_path / "d.npz", **arrays)
    assert train(tmp_path / "d.npz", tmp_path / "run") == 0
    assert cli.main(["test", str(tmp_path / "run")]) == 2
    assert "d.npz: y_test: label '7' is not one of the model's 3 classes ('0', '1', '2')" in one_line_error(capsys)


def test_npz_labels_that_are_integers_as_text_are_integers(tmp_path, rng):
    x, _ = synthetic(rng, 4, (1, 4, 4))
    numpy.savez(tmp_path / "d.npz", x_train=x, y_train=numpy.array(["10", " 2", "10", "-1"]))
    dataset = load_custom(tmp_path / "d.npz")
    assert dataset.classes == ["-1", "2", "10"] and dataset.labels.tolist() == [2, 1, 2, 0]
    numpy.savez(tmp_path / "d.npz", x_train=x, y_train=numpy.array(["a", "b", " ", "a"]))
    with pytest.raises(ValueError, match=r"d.npz: y_train: label 2 is empty"):
        load_custom(tmp_path / "d.npz")


def test_npz_string_labels_and_a_test_split_in_another_order(tmp_path, rng):
    write_npz(tmp_path / "d.npz", rng, names=["zebra", "ant", "moth"])
    dataset = load_custom(tmp_path / "d.npz")
    assert dataset.classes == ["ant", "moth", "zebra"]
    test = load_custom(tmp_path / "d.npz", "test", classes=["moth", "zebra", "ant"])
    raw = numpy.load(tmp_path / "d.npz")["y_test"]
    assert [["moth", "zebra", "ant"][i] for i in test.labels] == raw.tolist()


# -- the validation split and normalisation ---------------------------------------
def test_validation_holds_out_ten_percent_capped_at_5000():
    assert [validation_size(n) for n in (60000, 50000, 20000, 1000, 59, 2)] == [5000, 5000, 2000, 100, 5, 1]
    with pytest.raises(ValueError, match="1 training image: at least two are needed"):
        validation_size(1)


def test_fashion_mnist_keeps_its_split_and_its_model(tmp_path):
    task = ImageClassification("fashion-mnist", batch_size=50, seed=3, limit=1000, model="mlp")
    full = load_images("fashion-mnist", "train")
    order = numpy.random.default_rng(3).permutation(60000)  # mnn's split since the beginning
    assert numpy.array_equal(task.val_y, full.labels[order[:5000][:200]])
    assert numpy.array_equal(task.train_y, full.labels[order[5000:][:1000]])
    assert task.model_defaults() == {"in_features": 784, "classes": 10}
    assert mnn.models.resolve({"name": "mlp", "kwargs": task.model_defaults()}) == \
        mnn.models.resolve({"name": "mlp", "kwargs": {"classes": 10}})
    scaled = full.images[order[5000:][:1000]].astype(numpy.float64) / 255
    assert vars(task.normalizer) == {"mean": float(scaled.mean()), "std": float(scaled.std())}


def test_colour_images_are_normalised_per_channel(rng):
    images = rng.integers(0, 256, (40, 3, 6, 6)).astype(numpy.uint8)
    images[:, 1] //= 4  # a darker green plane
    normalizer = Normalizer.fit(images)
    assert isinstance(normalizer.mean, list) and len(normalizer.std) == 3
    normalized = normalizer(images)
    assert normalized.dtype == numpy.float32
    assert numpy.allclose(normalized.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert numpy.allclose(normalized.std(axis=(0, 2, 3)), 1, atol=1e-5)
    mean, std = channel_statistics(images, chunk=7)  # chunked: the same as all at once
    scaled = images / 255
    assert numpy.allclose(mean, scaled.mean(axis=(0, 2, 3)), rtol=0, atol=1e-14)
    assert numpy.allclose(std, scaled.std(axis=(0, 2, 3)), rtol=0, atol=1e-14)
    assert numpy.array_equal(Normalizer(**vars(normalizer))(images), normalized)  # as a checkpoint stores it


def test_a_constant_channel_cannot_be_normalised(rng):
    images = rng.integers(0, 256, (5, 3, 4, 4)).astype(numpy.uint8)
    images[:, 2] = 9
    with pytest.raises(ValueError, match="cannot normalise channel 2 of 5 images: every pixel in it equals 9"):
        Normalizer.fit(images)


# -- bad input: one line naming the file ------------------------------------------
def png_bytes(shape=(8, 8)):
    """A PNG of noise (which does not compress: cut in half, its pixel data is cut too)."""
    buffer = io.BytesIO()
    Image.fromarray(numpy.random.default_rng(0).integers(0, 256, shape).astype(numpy.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def small_folder(folder, rng, count=12):
    return write_folder(folder, rng, shape=(3, 8, 8), count=count)


def bad_folder_cases():
    def not_an_image(folder, rng):
        small_folder(folder, rng)
        (folder / "dog" / "broken.png").write_bytes(b"this is no PNG")
        return r"dog/broken.png: not an image that can be read"

    def truncated(folder, rng):
        small_folder(folder, rng)
        data = png_bytes()
        (folder / "dog" / "cut.png").write_bytes(data[:len(data) // 2])
        return r"dog/cut.png: cannot be decoded"

    def mixed_sizes(folder, rng):
        small_folder(folder, rng)
        Image.fromarray(numpy.full((10, 8), 7, numpy.uint8)).save(folder / "emu" / "tall.png")
        return r"images of different sizes: .*cat/000.png is 8 x 8, .*emu/tall.png is 8 x 10 pixels; resize them"

    def empty_class(folder, rng):
        small_folder(folder, rng)
        (folder / "yak").mkdir()
        (folder / "yak" / "readme.txt").write_text("no images here")
        return r"yak: an empty class folder \(no .png, .jpg"

    def no_class_folders(folder, rng):
        folder.mkdir()
        (folder / "loose.png").write_bytes(png_bytes())
        return r"no class folders in it; an image folder holds one folder per class: .*/<class name>/<image files>"

    def one_class(folder, rng):
        write_folder(folder, rng, shape=(3, 8, 8), count=5, names=["only"])
        return r"every class folder is 'only': a classifier needs at least two classes"

    def blank(folder, rng):
        for name in ("a", "b"):
            (folder / name).mkdir(parents=True)
            Image.fromarray(numpy.zeros((4, 4), numpy.uint8)).save(folder / name / "0.png")
        return r"every pixel of every image is 0: blank images"

    return {f.__name__: f for f in (not_an_image, truncated, mixed_sizes, empty_class, no_class_folders, one_class,
                                    blank)}


BAD_FOLDERS = bad_folder_cases()


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_image_folder_is_refused_naming_the_file(tmp_path, rng, case):
    message = BAD_FOLDERS[case](tmp_path / "data", rng)
    with pytest.raises(ValueError, match=message) as caught:
        load_custom(tmp_path / "data")
    assert "\n" not in str(caught.value) and str(tmp_path / "data") in str(caught.value)


def test_grey_folders_give_one_channel_and_any_colour_image_three(tmp_path, rng):
    write_folder(tmp_path / "grey", rng, shape=(1, 8, 8), count=9)
    assert load_custom(tmp_path / "grey").images.shape == (9, 1, 8, 8)
    Image.fromarray(numpy.full((8, 8, 3), (200, 10, 10), numpy.uint8)).save(tmp_path / "grey" / "cat" / "red.png")
    mixed = load_custom(tmp_path / "grey")
    assert mixed.images.shape == (10, 3, 8, 8) and mixed.images[0, 0].tolist() == mixed.images[0, 2].tolist()
    assert load_custom(tmp_path / "grey", channels=1).images.shape == (10, 1, 8, 8)  # as a grey model takes them


def bad_csv_cases():
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 5))
    return {  # the file's text, what the error must say
        "row of the wrong length": (f"{header}\n1,0,1,2,3\n0,5,6,7\n", r"g.csv line 3: 4 values, but the header "
                                                                        r"names 5 columns"),
        "non-numeric pixel": (f"{header}\n1,0,1,2,3\n0,4,5,x7,6\n", r"g.csv line 3: column 'pixel3' holds 'x7', "
                                                                     r"not a number"),
        "empty pixel": (f"{header}\n1,0,1,2,3\n0,4,,6,7\n", r"g.csv line 3: column 'pixel2' holds '', not a number"),
        "NaN pixel": (f"{header}\n1,0,1,2,3\n0,4,5,nan,7\n", r"g.csv: 1 pixel values are NaN or infinite "
                                                             r"\(the first in line 3\)"),
        "pixel above 255": (f"{header}\n1,0,1,2,3\n0,4,300,6,7\n", r"g.csv: pixel value 300.0 in line 3 lies outside "
                                                                   r"\[0, 255\]; give raw pixels"),
        "negative pixel": (f"{header}\n1,0,-1,2,3\n0,4,5,6,7\n", r"pixel value -1.0 in line 2 lies outside"),
        "no header": ("1,0,1,2,3\n0,4,5,6,7\n", r"g.csv: the first row holds numbers, not column names"),
        "not square": ("label,a,b,c\n1,0,1,2\n0,3,4,5\n", r"g.csv: 3 pixel columns besides the label 'label': not a "
                                                         r"square number"),
        "trailing comma": ("label,a,b,c,d,\n1,0,1,2,3,\n", r"g.csv: 5 pixel columns besides the label 'label': "
                                                               r"not a square number; .* \(the header's last column has "
                                                               r"no name: a trailing comma\?\)$"),
        "no label": (f"{header}\n ,0,1,2,3\n", r"g.csv line 2: no label in column 'label'"),
        "header only": (f"{header}\n", r"g.csv: a header but no rows: holds no images"),
        "empty file": ("", r"g.csv: empty; expected a header row"),
        "blank images": (f"{header}\n1,5,5,5,5\n0,5,5,5,5\n", r"g.csv: every pixel of every image is 5.0: blank"),
        "one class": (f"{header}\n1,0,1,2,3\n1,4,5,6,7\n", r"g.csv: every label is '1': a classifier needs at least "
                                                           r"two classes"),
        "two label columns": ("label,Label,a,b,c,d\n", r"g.csv: 2 columns are named label"),
        "not text": (b"label,p1,p2,p3,p4\n1,\xff\xfe,2,3,4\n",
                     r"g.csv: not UTF-8 text \('utf-8' codec can't decode byte 0xff"),
    }


BAD_CSVS = bad_csv_cases()


@pytest.mark.parametrize("case", BAD_CSVS)
def test_a_bad_csv_is_refused_naming_the_file_and_line(tmp_path, case):
    content, message = BAD_CSVS[case]
    path = tmp_path / "g.csv"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_custom(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_csv_read_in_chunks_keeps_line_numbers(tmp_path, rng, monkeypatch):
    from mnn.data import custom
    monkeypatch.setattr(custom, "CSV_CHUNK", 4)
    images, labels = write_csv(tmp_path / "g.csv", rng, count=11, side=3)
    dataset = load_custom(tmp_path / "g.csv")
    assert numpy.array_equal(dataset.images, images) and dataset.images.dtype == numpy.uint8
    assert [dataset.classes[i] for i in dataset.labels] == [["a", "b", "c"][i] for i in labels]
    lines = (tmp_path / "g.csv").read_text().splitlines()
    lines[10] = lines[10].replace(",", ",q", 1)  # line 11 of the file, in the third chunk
    (tmp_path / "g.csv").write_text("\n".join(lines) + "\n\n")
    with pytest.raises(ValueError, match=r"g.csv line 11: column 'pixel1' holds 'q\d+', not a number"):
        load_custom(tmp_path / "g.csv")


def bad_npz_cases():
    x, y = synthetic(numpy.random.default_rng(5), 20, (3, 6, 6))
    nan = x.astype(numpy.float32)
    nan[3, 1, 2, 2] = numpy.nan
    constant = x.copy()
    constant[:, 2] = 0
    return {  # arrays to save (None: not an .npz at all), what the error must say
        "no y_train": ({"x_train": x}, r"d.npz: holds x_train; expected x_train and y_train"),
        "capitalised keys": ({"X_train": x, "Y_train": y}, r"d.npz: holds X_train, Y_train; expected x_train"),
        "fewer labels": ({"x_train": x, "y_train": y[:19]}, r"d.npz: x_train holds 20 images but y_train holds 19 "
                                                            r"labels"),
        "channels last": ({"x_train": x.transpose(0, 2, 3, 1), "y_train": y},
                          r"d.npz: x_train: shape \(20, 6, 6, 3\) looks channels-last \(N, H, W, C\); .*transpose"),
        "flat images": ({"x_train": x.reshape(20, -1), "y_train": y}, r"d.npz: x_train: expected images \(N, H, W\) or "
                                                                      r"\(N, C, H, W\), found an array of shape"),
        "float labels": ({"x_train": x, "y_train": y.astype(float)}, r"d.npz: y_train: labels must be integers or "
                                                                      r"strings, found float64"),
        "labels not a vector": ({"x_train": x, "y_train": y[:, None]}, r"y_train: expected one label per image"),
        "boolean pixels": ({"x_train": x > 9, "y_train": y}, r"d.npz: x_train: pixels must be numbers, found bool"),
        "object arrays": ({"x_train": numpy.array([x[0], "a"], dtype=object), "y_train": y[:2]},
                          r"d.npz: x_train cannot be read \(ValueError: Object arrays cannot be loaded"),
        "NaN pixels": ({"x_train": nan, "y_train": y}, r"d.npz: x_train: 1 pixel values are NaN or infinite \(the "
                                                       r"first in x_train\[3\]\)"),
        "negative pixels": ({"x_train": x.astype(numpy.int16) - 1, "y_train": y},
                            r"d.npz: x_train: pixel value -1 in x_train\[\d+\] lies outside \[0, 255\]"),
        "normalised already": ({"x_train": (x - 100.0) / 50, "y_train": y}, r"lies outside \[0, 255\]"),
        "blank": ({"x_train": numpy.zeros_like(x), "y_train": y}, r"every pixel of every image is 0: blank images"),
        "a constant channel": ({"x_train": constant, "y_train": y}, r"d.npz: x_train: channel 2 is 0 in every pixel "
                                                                    r"of every image"),
        "no images": ({"x_train": x[:0], "y_train": y[:0]}, r"d.npz: x_train: holds no images"),
        "x_test alone": ({"x_train": x, "y_train": y, "x_test": x}, r"d.npz: holds x_test without y_test"),
        "not an npz": (None, r"d.npz: not an .npz archive that can be read"),
        "noise": (b"\x00\x01 neither a zip nor NumPy's", r"d.npz: not an .npz archive that can be read \(its first "
                                                          r"bytes are neither a zip archive's nor NumPy's\)"),
    }


BAD_NPZS = bad_npz_cases()


@pytest.mark.parametrize("case", BAD_NPZS)
def test_a_bad_npz_is_refused_naming_the_file(tmp_path, case):
    arrays, message = BAD_NPZS[case]
    path = tmp_path / "d.npz"
    if arrays is None:
        path.write_bytes(b"PK\3\4 but then nothing a zip holds")
    elif isinstance(arrays, bytes):
        path.write_bytes(arrays)
    else:
        numpy.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as caught:
        load_custom(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_an_npy_is_not_an_npz(tmp_path):
    numpy.save(tmp_path / "d.npy", numpy.zeros(3))
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"d.npz: one array \(.npy\), not an .npz archive"):
        load_custom(tmp_path / "d.npz")


@pytest.mark.parametrize("flags,message", [
    (["--data", "/nonexistent/images"], "/nonexistent/images (--data) does not exist"),
    (["--data", "{tmp}/notes.txt"], "notes.txt (--data): expected a folder of class folders of images, an .npz"),
    (["--data", "{tmp}/d.npz", "--dataset", "mnist"], "--data is your own data set; leave out --dataset"),
    (["--data", "{tmp}/d.npz", "--data-dir", "{tmp}"], "--data is your own data set; leave out --data-dir"),
    (["--data", "{tmp}/d.npz", "--model", "gpt"], "d.npz is not UTF-8 text"),
    (["--data", "{tmp}/d.npz", "--batch-size", "100"],
     "the batch size, 100, exceeds the 54 training samples left after the validation split: give --batch-size 54"),
    (["--data", "{tmp}/d.npz"], "the batch size, 128, exceeds the 54 training samples"),  # the mlp's default
])
def test_the_command_line_refuses_bad_data_in_one_line(tmp_path, rng, capsys, flags, message):
    write_npz(tmp_path / "d.npz", rng)
    (tmp_path / "notes.txt").write_text("hello")
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    assert cli.main(["train", *flags, "--steps", "2", "--quiet", "--out", str(tmp_path / "run")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_mnn_test_refuses_images_of_another_shape_or_without_a_test_split(tmp_path, rng, capsys):
    write_npz(tmp_path / "d.npz", rng)
    assert train(tmp_path / "d.npz", tmp_path / "run") == 0
    write_npz(tmp_path / "small.npz", rng, shape=(3, 28, 28))
    assert cli.main(["test", str(tmp_path / "run"), "--data", str(tmp_path / "small.npz")]) == 2
    assert "small.npz: images of shape (C, H, W) = (3, 28, 28); the model takes (3, 32, 32)" in one_line_error(capsys)
    write_npz(tmp_path / "train_only.npz", rng, x_test=None, y_test=None)
    assert cli.main(["test", str(tmp_path / "run"), "--data", str(tmp_path / "train_only.npz")]) == 2
    assert "train_only.npz: holds no test split (x_test, y_test), only x_train, y_train" in one_line_error(capsys)


def test_a_fashion_mnist_model_tests_on_a_kaggle_style_csv(tmp_path, capsys):
    """Labels 0-9 are the indices of the model's named classes."""
    run = tmp_path / "run"
    assert cli.main(["train", "--limit", "400", "--batch-size", "50", "--hidden", "8", "--steps", "4", "--quiet",
                     "--out", str(run)]) == 0
    test = load_images("fashion-mnist", "test")
    lines = ["label," + ",".join(f"pixel{i}" for i in range(1, 785))]
    lines += [f"{label}," + ",".join(map(str, image.reshape(-1))) for image, label in
              zip(test.images[:100], test.labels[:100])]
    (tmp_path / "fashion-mnist_test.csv").write_text("\n".join(lines) + "\n")
    assert cli.main(["test", str(run), "--data", str(tmp_path / "fashion-mnist_test.csv")]) == 0
    from_csv = json.loads((run / "test.json").read_text())
    assert "Ankle boot" in from_csv["per_class"] and sum(map(sum, from_csv["confusion"])) == 100
    model = mnn.load(run)
    expected = (model.predict(test.images[:100]) == test.labels[:100]).mean()
    assert from_csv["test_accuracy"] == pytest.approx(expected)


def test_sixteen_bit_grey_images_are_scaled_to_bytes_not_clipped(tmp_path):
    """Pillow's own conversion to 8 bits clips them at 255: 20000 and 40000 would both read as white."""
    for name, value in (("dark", 20000), ("light", 40000)):
        (tmp_path / name).mkdir()
        for index in range(2):
            Image.fromarray(numpy.full((6, 5), value + index, numpy.uint16)).save(tmp_path / name / f"{index}.png")
    images, names, _ = read_image_folder(tmp_path)
    assert images.shape == (4, 1, 6, 5) and images.dtype == numpy.uint8
    assert images[:, 0, 0, 0].tolist() == [78, 78, 156, 156] and names.tolist() == ["dark"] * 2 + ["light"] * 2


def test_floating_point_images_are_refused_by_name(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(numpy.full((4, 4), 0.5, numpy.float32)).save(tmp_path / name / "x.tif")
    with pytest.raises(ValueError, match=r"a/x.tif: a floating-point image \(Pillow mode F\)"):
        read_image_folder(tmp_path)


def test_csv_labels_written_as_whole_floats_are_integers_by_value(tmp_path, rng):
    """pandas writes an integer column that has gaps as 0.0, 1.0, ...: as text, 10.0 would sort before 2.0."""
    names = tuple(f"{label}.0" for label in range(11))
    _, labels = write_csv(tmp_path / "f.csv", rng, count=44, side=4, names=names)
    dataset = load_custom(tmp_path / "f.csv")
    assert dataset.classes == [str(label) for label in range(11)] and dataset.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("make, message", [
    (lambda path, rng: numpy.savez(path, x_train=numpy.zeros((40, 8, 0), numpy.uint8), y_train=numpy.arange(40) % 2),
     r"images of shape \(C, H, W\) = \(1, 8, 0\) hold no pixels"),
    (lambda path, rng: numpy.savez(path, x_train=synthetic(rng, 3, (1, 4, 4))[0],
                                   y_train=numpy.array([2 ** 63 + 5, 1, 2], numpy.uint64)),
     r"label 9223372036854775813 does not fit in 64 signed bits"),
])
def test_npz_shapes_and_labels_no_model_can_take_are_named(tmp_path, rng, make, message):
    make(tmp_path / "d.npz", rng)
    with pytest.raises(ValueError, match=message):
        load_custom(tmp_path / "d.npz")


def test_a_csv_pixel_with_an_underscore_is_named_as_no_number(tmp_path, rng):
    write_csv(tmp_path / "u.csv", rng, count=4, side=2)
    lines = (tmp_path / "u.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",1_0"
    (tmp_path / "u.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"u.csv line 3: column 'pixel4' holds '1_0', not a number"):
        load_custom(tmp_path / "u.csv")


@pytest.mark.parametrize("text, value", [("7", 7), ("7.0", 7), (" -3.00 ", -3), ("+2", 2), ("1e3", None), ("3.5", None),
                                         ("nan", None), ("1_000", None), ("9007199254740993.0", 9007199254740993)])
def test_an_integer_label_is_digits_perhaps_with_a_zero_fraction(text, value):
    from mnn.data.custom import integer_label
    assert integer_label(text) == value


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero(tmp_path, rng, capsys):
    arrays = write_npz(tmp_path / "data.npz", rng)
    run = tmp_path / "run"
    assert train(tmp_path / "data.npz", run, "--limit", "40", "--model", "mlp") == 0
    only_class_1 = arrays["y_test"] == 1
    numpy.savez(tmp_path / "held.npz", x_test=arrays["x_test"][only_class_1], y_test=arrays["y_test"][only_class_1])
    capsys.readouterr()
    assert cli.main(["test", str(run), "--data", str(tmp_path / "held.npz")]) == 0
    assert "  0            no test images\n" in capsys.readouterr().out
    per_class = json.loads((run / "test.json").read_text())["per_class"]
    assert per_class["0"] is None and per_class["2"] is None and 0 <= per_class["1"] <= 1


def test_class_names_no_font_has_draw_without_warnings(tmp_path):
    import warnings
    from mnn.plots import plot_confusion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(numpy.eye(2, dtype=int), ["chât 猫", "dog"], tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 0 and not [w for w in caught if "Glyph" in str(w.message)]


def test_a_confusion_matrix_of_many_classes_is_drawn_without_a_text_per_cell(tmp_path, monkeypatch):
    """400 classes: 160,000 cells, each a text, took a minute and a half to draw."""
    import matplotlib.axes
    from mnn.plots import plot_confusion
    texts = []
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, *args, **kwargs: texts.append(args))
    plot_confusion(numpy.eye(400, dtype=int), [str(k) for k in range(400)], tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 0 and texts == []
    plot_confusion(numpy.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "small.png")
    assert len(texts) == 9


def test_testing_a_run_whose_data_moved_says_how_to_point_to_it(tmp_path, rng, capsys):
    write_npz(tmp_path / "data.npz", rng)
    run = tmp_path / "run"
    assert train(tmp_path / "data.npz", run, "--limit", "40", "--model", "mlp") == 0
    (tmp_path / "data.npz").rename(tmp_path / "moved.npz")
    capsys.readouterr()
    assert cli.main(["test", str(run)]) == 2
    assert "if it moved, give its new place: mnn test" in one_line_error(capsys)
    assert cli.main(["test", str(run), "--data", str(tmp_path / "moved.npz")]) == 0


def test_a_training_split_too_uniform_to_normalise_names_the_data_and_the_split(tmp_path, capsys):
    """The data as a whole varies, but the one image the validation split left to train on does not."""
    x = numpy.zeros((2, 1, 1, 1), numpy.uint8)
    x[1] = 200
    numpy.savez(tmp_path / "d.npz", x_train=x, y_train=numpy.array([0, 1]))
    assert cli.main(["train", "--data", str(tmp_path / "d.npz"), "--batch-size", "1", "--steps", "1", "--quiet",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd.npz'}: the 1 training images left after the validation split: cannot normalise" in err
