"""IDX reading, dataset lookup, checks of what is loaded, and checked downloads, on files the tests write."""
import gzip
import hashlib
import tracemalloc
import zlib

import numpy
import pytest

from mnn import cli
from mnn.data import ChecksumError, IdxError, download, images, load_images, read_idx, write_idx
from mnn.data.download import file_digest
from mnn.data.images import FILES, Normalizer


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, rng, name):
    array = rng.integers(0, 256, (7, 5, 3)).astype(numpy.uint8)
    write_idx(tmp_path / name, array)
    assert numpy.array_equal(read_idx(tmp_path / name), array)


def test_idx_other_types(tmp_path, rng):
    array = rng.standard_normal((4, 2)).astype(numpy.float32)
    write_idx(tmp_path / "f.idx", array)
    assert numpy.array_equal(read_idx(tmp_path / "f.idx"), array)


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_idx_truncated_data(tmp_path):
    write_idx(tmp_path / "t.idx", numpy.zeros((10, 4), numpy.uint8))
    data = (tmp_path / "t.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(data[:-5])
    with pytest.raises(IdxError, match=r"needs 52 bytes, file has 47"):
        read_idx(tmp_path / "t.idx")


def test_idx_truncated_header(tmp_path):
    (tmp_path / "h.idx").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(IdxError, match="3 dimensions"):
        read_idx(tmp_path / "h.idx")


def test_idx_truncated_gzip(tmp_path):
    write_idx(tmp_path / "t.idx.gz", numpy.arange(1000, dtype=numpy.uint8).reshape(10, 100) % 7)
    data = (tmp_path / "t.idx.gz").read_bytes()
    (tmp_path / "t.idx.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxError, match="corrupt or truncated gzip"):
        read_idx(tmp_path / "t.idx.gz")


def test_idx_with_more_data_than_its_header_declares(tmp_path):
    write_idx(tmp_path / "m.idx.gz", numpy.zeros((10, 4), numpy.uint8))
    data = gzip.decompress((tmp_path / "m.idx.gz").read_bytes())
    (tmp_path / "m.idx.gz").write_bytes(gzip.compress(data + b"\0"))
    with pytest.raises(IdxError, match=r"needs 52 bytes, the file holds more"):
        read_idx(tmp_path / "m.idx.gz")


def gzip_bomb(path, declared_shape, inflated_bytes):
    """A small gzip file whose IDX header declares ``declared_shape`` but which inflates to ``inflated_bytes``."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    header = bytes([0, 0, 0x08, len(declared_shape)]) + numpy.asarray(declared_shape, ">u4").tobytes()
    parts = [compressor.compress(header)]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(inflated_bytes >> 20)]
    path.write_bytes(b"".join(parts) + compressor.flush())


def test_gzip_bomb_is_not_inflated_past_the_declared_size(tmp_path):
    gzip_bomb(tmp_path / "bomb.gz", (1000, 28, 28), 256 << 20)  # about 250 KB that inflate to 256 MiB
    assert (tmp_path / "bomb.gz").stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(IdxError, match=r"needs 784016 bytes, the file holds more"):
            read_idx(tmp_path / "bomb.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated: the file was inflated past its header's size"


@pytest.mark.parametrize("shape", [(2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1), (70_000, 1000, 1000),
                                   (0, 2 ** 32 - 1, 2 ** 32 - 1)])
def test_idx_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path, shape):
    gzip_bomb(tmp_path / "huge.gz", shape, 1 << 20)
    with pytest.raises(IdxError, match=r"IDX header declares shape .* more than the \d+ accepted"):
        read_idx(tmp_path / "huge.gz")


def test_idx_header_declaring_more_dimensions_than_any_data_set_is_refused(tmp_path):
    (tmp_path / "deep").write_bytes(bytes([0, 0, 8, 70]) + bytes(280))
    with pytest.raises(IdxError, match=r"deep: IDX header declares 70 dimensions, more than the 8 accepted"):
        read_idx(tmp_path / "deep")


def test_download_checks_sha256(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"mnn" * 1000)
    good = file_digest(source)
    target = download(source.as_uri(), tmp_path / "cache" / "file.bin", good)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(ChecksumError, match="does not match"):
        download(source.as_uri(), tmp_path / "cache" / "other.bin", "0" * 64)
    assert not (tmp_path / "cache" / "other.bin").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["file.bin"], "no temporary file left behind"


def fake_dataset(folder, rng, n=20, **replaced):
    """The four files of a small random data set in ``folder``; ``replaced`` swaps in other arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n, 28, 28)).astype(numpy.uint8),
              "train_labels": rng.integers(0, 10, n).astype(numpy.uint8),
              "test_images": rng.integers(0, 256, (n // 2, 28, 28)).astype(numpy.uint8),
              "test_labels": rng.integers(0, 10, n // 2).astype(numpy.uint8), **replaced}
    for key, array in arrays.items():
        write_idx(folder / FILES[key], array)
    return arrays


def idx_sha256(path):
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


@pytest.fixture
def publish(monkeypatch):
    """Make the files the tests write in a folder the published ones of a data set (its known hashes)."""
    def publish_folder(folder, name="fashion-mnist", **spec):
        hashes = {key: idx_sha256(folder / file) for key, file in FILES.items()}
        monkeypatch.setitem(images.DATASETS, name, {**images.DATASETS[name], "idx_sha256": hashes, **spec})
    return publish_folder


def test_dataset_download_from_a_mirror_into_the_cache(tmp_path, monkeypatch, rng, publish):
    arrays = fake_dataset(tmp_path / "mirror", rng)
    sums = {key: file_digest(tmp_path / "mirror" / name) for key, name in FILES.items()}
    publish(tmp_path / "mirror", "mnist", mirrors=[(tmp_path / "mirror").as_uri() + "/"],
            system_dir=str(tmp_path / "absent"), sha256=sums)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    data = load_images("mnist", "train")
    assert numpy.array_equal(data.images[:, 0], arrays["train_images"])
    assert (tmp_path / "cache" / "mnist" / FILES["test_labels"]).is_file()
    images.DATASETS["mnist"]["sha256"] = {key: "f" * 64 for key in FILES}
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ConnectionError, match=r"idx3-ubyte.gz: sha256 [0-9a-f]{64} does not match"):
        load_images("mnist", "test")


def test_dataset_uses_the_given_folder(tmp_path, rng, publish):
    arrays = fake_dataset(tmp_path / "mine", rng)
    publish(tmp_path / "mine")
    data = load_images("fashion-mnist", "test", tmp_path / "mine")
    assert numpy.array_equal(data.labels, arrays["test_labels"])
    assert data.labels.dtype == numpy.int64 and data.images.shape == (10, 1, 28, 28)


def test_a_given_folder_that_does_not_exist_is_an_error(tmp_path):
    """It used to fall back to the system's Fashion-MNIST without a word."""
    with pytest.raises(FileNotFoundError, match=r"^data folder .*nonexistent \(--data-dir\) does not exist$"):
        load_images("fashion-mnist", "train", tmp_path / "nonexistent")


def test_a_given_folder_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"data folder .*file \(--data-dir\) is not a folder"):
        load_images("mnist", "test", tmp_path / "file")


def test_a_given_folder_without_the_four_files_names_the_missing_ones(tmp_path, rng):
    fake_dataset(tmp_path / "some", rng)
    (tmp_path / "some" / FILES["train_labels"]).unlink()
    (tmp_path / "some" / FILES["test_images"]).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        load_images("mnist", "train", tmp_path / "some")
    message = str(caught.value)
    assert f"{tmp_path / 'some'} (--data-dir) lacks {FILES['train_labels']}, {FILES['test_images']} of mnist" in message
    assert "dataset-fashion-mnist" not in message and "\n" not in message


def test_the_command_line_reports_a_bad_data_dir_in_one_line(tmp_path, capsys):
    assert cli.main(["train", "--data-dir", str(tmp_path / "nonexistent"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nonexistent (--data-dir) does not exist" in error


def test_files_of_another_data_set_are_refused_naming_both():
    """Fashion-MNIST's files given as MNIST (here Debian's, compressed again) were accepted silently."""
    with pytest.raises(ChecksumError, match=r"t10k-images-idx3-ubyte.gz is not mnist's test images file: .* "
                                            r"\(it is fashion-mnist's test images file\)"):
        load_images("mnist", "test", images.DATASETS["fashion-mnist"]["system_dir"])


def test_unpublished_files_are_refused(tmp_path, rng):
    fake_dataset(tmp_path / "mine", rng)
    with pytest.raises(ChecksumError, match=r"train-images-idx3-ubyte.gz is not fashion-mnist's train images file: "
                                            r"the sha256 of its IDX contents is [0-9a-f]{64}, not c59f468a"):
        load_images("fashion-mnist", "train", tmp_path / "mine")


def test_a_compressed_or_uncompressed_copy_of_the_published_files_passes(tmp_path, rng, publish):
    arrays = fake_dataset(tmp_path / "mine", rng)
    publish(tmp_path / "mine")
    path = tmp_path / "mine" / FILES["train_images"]
    path.write_bytes(gzip.decompress(path.read_bytes()))  # the same IDX bytes, not compressed
    assert numpy.array_equal(load_images("fashion-mnist", "train", tmp_path / "mine").images[:, 0],
                             arrays["train_images"])


BAD_CONTENTS = {
    "label 10": ({"train_labels": numpy.array([3] * 7 + [10] + [2] * 12, numpy.uint8)},
                 r"train-labels.*: label 10 at index 7 is not a class in \[0, 10\) \(1 such labels\)"),
    "negative label": ({"train_labels": numpy.full(20, -1, numpy.int8)},
                       r"label -1 at index 0 is not a class .*\(20 such labels\)"),
    "float labels": ({"train_labels": numpy.full(20, 1.5, numpy.float32)},
                     r"train-labels.*: labels must be integers, found float32"),
    "labels not a vector": ({"train_labels": numpy.zeros((20, 1), numpy.uint8)},
                            r"train-labels.*: expected one label per image, found an array of shape \(20, 1\)"),
    "fewer labels": ({"train_labels": numpy.zeros(19, numpy.uint8)},
                     r"train-images.* holds 20 images but .*train-labels.* holds 19 labels"),
    "blank images": ({"train_images": numpy.zeros((20, 28, 28), numpy.uint8)},
                     r"train-images.*: every pixel of every image is 0: blank images"),
    "constant images": ({"train_images": numpy.full((20, 28, 28), 255, numpy.uint8)},
                        r"every pixel of every image is 255"),
    "NaN pixels": ({"train_images": numpy.where(numpy.arange(20 * 784).reshape(20, 28, 28) % 100 == 0, numpy.nan,
                                                numpy.ones((20, 28, 28))).astype(numpy.float32)},
                   r"train-images.*: 157 pixels are NaN or infinite"),
    "infinite pixels": ({"train_images": numpy.full((20, 28, 28), numpy.inf)}, r"15680 pixels are NaN or infinite"),
    "no images": ({"train_images": numpy.zeros((0, 28, 28), numpy.uint8), "train_labels": numpy.zeros(0, numpy.uint8)},
                  r"train-images.* holds no images"),
    "other image size": ({"train_images": numpy.ones((20, 32, 32), numpy.uint8)},
                         r"train-images.*: expected images of 28 x 28 pixels, found an array of shape \(20, 32, 32\)"),
}


@pytest.mark.parametrize("case", BAD_CONTENTS)
def test_bad_contents_are_refused_when_loaded_naming_the_file(tmp_path, rng, publish, case):
    """Even files whose hashes are trusted: label 10 used to crash at step ~700, blank images made the loss NaN."""
    replaced, message = BAD_CONTENTS[case]
    fake_dataset(tmp_path / "bad", rng, **replaced)
    publish(tmp_path / "bad")
    with pytest.raises(ValueError, match=message):
        load_images("fashion-mnist", "train", tmp_path / "bad")


def test_normalizer_uses_training_statistics(rng):
    images = rng.integers(0, 256, (50, 1, 28, 28)).astype(numpy.uint8)
    normalized = Normalizer.fit(images)(images)
    assert normalized.dtype == numpy.float32
    assert abs(normalized.mean()) < 1e-4 and abs(normalized.std() - 1) < 1e-4


def test_normalizer_refuses_constant_images():
    with pytest.raises(ValueError, match="cannot normalise 3 images whose pixels all equal 7"):
        Normalizer.fit(numpy.full((3, 1, 28, 28), 7, numpy.uint8))


def test_real_fashion_mnist_is_installed():
    """CI installs Debian's dataset-fashion-mnist; the real-data tests depend on it."""
    data = load_images("fashion-mnist", "test")
    assert data.images.shape == (10000, 1, 28, 28) and numpy.bincount(data.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_unreachable_mirrors_give_a_clear_error(tmp_path, monkeypatch, name):
    spec = {**images.DATASETS[name], "mirrors": [(tmp_path / "nowhere").as_uri() + "/"],
            "system_dir": str(tmp_path / "absent")}
    monkeypatch.setitem(images.DATASETS, name, spec)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError) as caught:
        load_images(name, "train")
    message = str(caught.value)
    assert "\n" not in message
    assert "train-images-idx3-ubyte.gz is in none of" in message and "could not be downloaded" in message
    assert "give it with --data-dir" in message and (tmp_path / "nowhere").as_uri() in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion-mnist")
