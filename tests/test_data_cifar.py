"""CIFAR-10 from its binary version, on archives and folders the tests write in that format
(fewer records per batch; the archive's checksums set to the written file's)."""
import hashlib
import io
import json
import tarfile

import numpy
import pytest

from mnn import cli
from mnn.checkpoint import read_checkpoint
from mnn.data import ChecksumError, cifar
from mnn.data.cifar import ARCHIVE, FOLDER, load_cifar10
from mnn.train import CHECKPOINT

AS_SHIPPED = (cifar.MD5, cifar.SHA256, cifar.RECORDS_PER_BATCH, cifar.MIRRORS)  # before any test changes them
RECORDS = 40  # per batch file here; 10,000 in the real one
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FILES = [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(cifar, "RECORDS_PER_BATCH", RECORDS)


def batches(rng):
    """Each file's (images (RECORDS, 3, 32, 32), labels), classes told apart by a brighter channel."""
    made = {}
    for name in FILES:
        labels = rng.integers(0, 10, RECORDS).astype(numpy.uint8)
        images = rng.integers(0, 150, (RECORDS, 3, 32, 32)).astype(numpy.uint8)
        images[numpy.arange(RECORDS), labels % 3] += 100
        made[name] = images, labels
    return made


def record_bytes(images, labels):
    """The format: per record, 1 label byte, then the R, G and B planes, row by row."""
    table = numpy.concatenate([labels[:, None], images.reshape(len(labels), -1)], axis=1)
    return table.astype(numpy.uint8).tobytes()


def contents(made, meta="\n".join(NAMES) + "\n\n"):
    return {**{name: record_bytes(*made[name]) for name in FILES}, "batches.meta.txt": meta.encode(),
            "readme.html": b"<html></html>"}


def write_archive(path, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def publish(monkeypatch, path):
    """Make ``path`` the published archive: its MD5 and SHA-256 the ones checked."""
    data = path.read_bytes()
    monkeypatch.setattr(cifar, "MD5", hashlib.md5(data).hexdigest())
    monkeypatch.setattr(cifar, "SHA256", hashlib.sha256(data).hexdigest())


def write_folder(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_the_published_checksums_are_the_ones_checked():
    md5, sha256, records, mirrors = AS_SHIPPED
    assert md5 == "c32a1d4ab5d03f1284b67883e8d87530"  # https://www.cs.toronto.edu/~kriz/cifar.html
    assert sha256 == "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"  # MLDatasets.jl, gomlx
    assert records == 10_000 and mirrors == ["https://www.cs.toronto.edu/~kriz/"]


def test_an_archive_is_read_as_written(tmp_path, rng, monkeypatch):
    made = batches(rng)
    publish(monkeypatch, write_archive(tmp_path / ARCHIVE, contents(made)))
    train = load_cifar10("train", tmp_path)
    assert train.images.shape == (5 * RECORDS, 3, 32, 32) and train.images.dtype == numpy.uint8
    assert numpy.array_equal(train.images[:RECORDS], made["data_batch_1.bin"][0])
    assert numpy.array_equal(train.images[-RECORDS:], made["data_batch_5.bin"][0])
    assert numpy.array_equal(train.labels, numpy.concatenate([made[n][1] for n in FILES[:5]]))
    assert train.labels.dtype == numpy.int64 and train.classes == NAMES
    test = load_cifar10("test", tmp_path)
    assert numpy.array_equal(test.images, made["test_batch.bin"][0]) and len(test) == RECORDS


def test_the_pixel_planes_are_red_green_blue_row_by_row(tmp_path, monkeypatch):
    """One record written byte by byte: pixel (row 1, column 2) of the green plane is byte 1 + 1024 + 32 + 2."""
    record = numpy.zeros(3073, numpy.uint8)
    record[0] = 7
    record[1 + 1024 + 32 + 2] = 200
    record[1 + 2048] = 99
    data = numpy.tile(record, RECORDS)
    data[RECORDS * 3073 - 1] = 1  # not blank everywhere else either
    files = {name: data.tobytes() for name in FILES}
    publish(monkeypatch, write_archive(tmp_path / ARCHIVE, {**files, "batches.meta.txt": "\n".join(NAMES).encode()}))
    image = load_cifar10("test", tmp_path).images[0]
    assert image[1, 1, 2] == 200 and image[2, 0, 0] == 99 and load_cifar10("test", tmp_path).labels[0] == 7


@pytest.mark.parametrize("where", [FOLDER, "."])
def test_an_extracted_folder_is_read_too(tmp_path, rng, where):
    made = batches(rng)
    write_folder(tmp_path / where, contents(made))
    test = load_cifar10("test", tmp_path)
    assert numpy.array_equal(test.images, made["test_batch.bin"][0]) and test.classes == NAMES


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_mnn_train_dataset_cifar10_then_mnn_test(tmp_path, rng, monkeypatch, capsys, model):
    publish(monkeypatch, write_archive(tmp_path / ARCHIVE, contents(batches(rng))))
    run = tmp_path / "run"
    size = ["--channels", "2,3"] if model == "cnn" else []
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", model, *size,
                     "--hidden", "8", "--steps", "3", "--batch-size", "16", "--quiet", "--out", str(run)]) == 0
    document = read_checkpoint(run / CHECKPOINT)[1]
    kwargs = document["architecture"]["kwargs"]
    assert (kwargs["in_channels"], kwargs["image_size"]) == (3, 32) if model == "cnn" else kwargs["in_features"] == 3072
    assert document["input_shape"] == [3, 32, 32] and document["classes"] == NAMES
    assert len(document["normalizer"]["mean"]) == 3 and document["config"]["dataset"] == "cifar10"
    assert f"mnn test {run}\n" in capsys.readouterr().out
    assert cli.main(["test", str(run)]) == 0
    report = json.loads((run / "test.json").read_text())
    assert list(report["per_class"]) == NAMES and sum(map(sum, report["confusion"])) == RECORDS


def test_a_download_is_checked_by_sha256_then_md5(tmp_path, rng, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    publish(monkeypatch, write_archive(mirror / ARCHIVE, contents(batches(rng))))
    monkeypatch.setattr(cifar, "MIRRORS", [mirror.as_uri() + "/"])
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    assert len(load_cifar10("test")) == RECORDS
    assert (tmp_path / "cache" / "cifar10" / ARCHIVE).read_bytes() == (mirror / ARCHIVE).read_bytes()
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(cifar, "MD5", "0" * 32)  # a file with the expected SHA-256 but another MD5
    with pytest.raises(ChecksumError, match=r"cifar-10-binary.tar.gz: MD5 [0-9a-f]{32} is not the published 0{32}; "
                                            r"file discarded"):
        load_cifar10("test")
    assert not (tmp_path / "cache2" / "cifar10" / ARCHIVE).exists()
    monkeypatch.setattr(cifar, "SHA256", "f" * 64)
    with pytest.raises(ConnectionError, match=r"sha256 [0-9a-f]{64} does not match the expected f{64}"):
        load_cifar10("test")


def test_unreachable_mirrors_say_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "MIRRORS", [(tmp_path / "nowhere").as_uri() + "/"])
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError) as caught:
        load_cifar10("train")
    message = str(caught.value)
    assert "\n" not in message and "cifar-10-binary.tar.gz is not in" in message
    assert "could not be downloaded" in message and "give it with --data-dir" in message


def test_an_unpublished_archive_is_refused(tmp_path, rng):
    write_archive(tmp_path / ARCHIVE, contents(batches(rng)))
    with pytest.raises(ChecksumError, match=r"cifar-10-binary.tar.gz is not the published cifar-10-binary.tar.gz: "
                                            r"MD5 [0-9a-f]{32} \(published: c32a1d4a"):
        load_cifar10("test", tmp_path)


def test_an_archive_that_is_no_tar_gz_is_refused(tmp_path, monkeypatch):
    (tmp_path / ARCHIVE).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ChecksumError, match=r"cifar-10-binary.tar.gz is not the published"):
        load_cifar10("test", tmp_path)
    publish(monkeypatch, tmp_path / ARCHIVE)  # even where its checksums were the published ones
    with pytest.raises(ValueError, match=r"cifar-10-binary.tar.gz: not a readable .tar.gz"):
        load_cifar10("test", tmp_path)


def test_an_archive_other_than_the_published_one_is_refused_before_anything_is_decompressed(tmp_path, monkeypatch):
    """A small gzip file can inflate to gigabytes: its checksums come first."""
    import gzip

    (tmp_path / ARCHIVE).write_bytes(gzip.compress(bytes(1 << 20)))

    def never(*args, **kwargs):
        raise AssertionError("the archive was opened before its checksums were checked")
    monkeypatch.setattr(tarfile, "open", never)
    with pytest.raises(ChecksumError, match=r"is not the published cifar-10-binary.tar.gz: MD5 [0-9a-f]{32}"):
        load_cifar10("test", tmp_path)


def bad_contents():
    def short_batch(files):
        files["data_batch_3.bin"] = files["data_batch_3.bin"][:-1]
        return r"data_batch_3.bin: 122,919 bytes; a CIFAR-10 batch holds 40 records of 3,073 bytes \(122,920 bytes\)"

    def long_batch(files):
        files["data_batch_2.bin"] += b"\0" * 3073
        return r"data_batch_2.bin: 122,921 bytes"  # read no further than one byte past the size

    def label_ten(files):
        data = bytearray(files["data_batch_1.bin"])
        data[3073 * 5] = 10
        files["data_batch_1.bin"] = bytes(data)
        return r"data_batch_1.bin: label 10 at index 5 is not a class in \[0, 10\) \(1 such labels\)"

    def nine_names(files):
        files["batches.meta.txt"] = "\n".join(NAMES[:9]).encode()
        return r"batches.meta.txt: expected 10 distinct class names, one a line; found 9 lines"

    def long_names(files):
        files["batches.meta.txt"] = "\n".join(NAMES).encode() + b"\n" + b"x" * 4096
        return r"batches.meta.txt: longer than the 4096 bytes ten class names take"

    def blank(files):
        for name in FILES[:5]:
            files[name] = bytes(3073 * RECORDS)
        return r"every pixel of every train image is 0: blank images"

    def missing_file(files):
        del files["data_batch_4.bin"]
        return None

    return {f.__name__: f for f in (short_batch, long_batch, label_ten, nine_names, long_names, blank, missing_file)}


BAD = bad_contents()


@pytest.mark.parametrize("form", ["archive", "folder"])
@pytest.mark.parametrize("case", BAD)
def test_bad_contents_are_refused_naming_the_file(tmp_path, rng, monkeypatch, case, form):
    """Even in an archive whose checksums are trusted (a corrupt published file would be caught)."""
    files = contents(batches(rng))
    message = BAD[case](files)
    if form == "archive":
        publish(monkeypatch, write_archive(tmp_path / ARCHIVE, files))
        message = message or r"cifar-10-binary.tar.gz: lacks cifar-10-batches-bin/data_batch_4.bin"
        error = ValueError
    else:
        write_folder(tmp_path / FOLDER, files)
        message = message or r"holds neither cifar-10-binary.tar.gz nor the files of cifar-10-batches-bin"
        error = ValueError if case != "missing_file" else FileNotFoundError
    with pytest.raises(error, match=message) as caught:
        load_cifar10("train", tmp_path)
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)


def test_a_data_dir_without_cifar_is_an_error(tmp_path, capsys):
    assert cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds neither cifar-10-binary.tar.gz nor" in err and "kriz" in err


def test_class_names_drop_a_byte_order_mark():
    from mnn.data.cifar import class_names
    assert class_names(b"\xef\xbb\xbf" + "\n".join(NAMES).encode(), "meta") == NAMES
