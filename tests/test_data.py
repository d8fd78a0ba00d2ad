"""IDX reading, dataset lookup and checked downloads, on files the tests write."""

import numpy
import pytest

from mnn.data import ChecksumError, IdxError, download, load_images, read_idx, write_idx
from mnn.data.download import sha256_of
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


def test_download_checks_sha256(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"mnn" * 1000)
    good = sha256_of(source)
    target = download(source.as_uri(), tmp_path / "cache" / "file.bin", good)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(ChecksumError, match="does not match"):
        download(source.as_uri(), tmp_path / "cache" / "other.bin", "0" * 64)
    assert not (tmp_path / "cache" / "other.bin").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["file.bin"], "no temporary file left behind"


def fake_dataset(folder, rng, n=20):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n, 28, 28)).astype(numpy.uint8),
              "train_labels": rng.integers(0, 10, n).astype(numpy.uint8),
              "test_images": rng.integers(0, 256, (n // 2, 28, 28)).astype(numpy.uint8),
              "test_labels": rng.integers(0, 10, n // 2).astype(numpy.uint8)}
    for key, array in arrays.items():
        write_idx(folder / FILES[key], array)
    return arrays


def test_dataset_download_from_a_mirror_into_the_cache(tmp_path, monkeypatch, rng):
    arrays = fake_dataset(tmp_path / "mirror", rng)
    sums = {key: sha256_of(tmp_path / "mirror" / name) for key, name in FILES.items()}
    from mnn.data import images
    spec = {**images.DATASETS["mnist"], "mirrors": [(tmp_path / "mirror").as_uri() + "/"],
            "system_dir": str(tmp_path / "absent"), "sha256": sums}
    monkeypatch.setitem(images.DATASETS, "mnist", spec)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    data = load_images("mnist", "train")
    assert numpy.array_equal(data.images[:, 0], arrays["train_images"])
    assert (tmp_path / "cache" / "mnist" / FILES["test_labels"]).is_file()
    spec["sha256"] = {key: "f" * 64 for key in FILES}
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ChecksumError):
        load_images("mnist", "test")


def test_dataset_prefers_the_given_folder(tmp_path, rng):
    arrays = fake_dataset(tmp_path / "mine", rng)
    data = load_images("fashion-mnist", "test", tmp_path / "mine")
    assert numpy.array_equal(data.labels, arrays["test_labels"])


def test_normalizer_uses_training_statistics(rng):
    images = rng.integers(0, 256, (50, 1, 28, 28)).astype(numpy.uint8)
    normalized = Normalizer.fit(images)(images)
    assert normalized.dtype == numpy.float32
    assert abs(normalized.mean()) < 1e-4 and abs(normalized.std() - 1) < 1e-4


def test_real_fashion_mnist_is_installed():
    """CI installs Debian's dataset-fashion-mnist; the real-data tests depend on it."""
    data = load_images("fashion-mnist", "test")
    assert data.images.shape == (10000, 1, 28, 28) and numpy.bincount(data.labels).tolist() == [1000] * 10


def test_unreachable_mirrors_give_a_clear_error(tmp_path, monkeypatch):
    from mnn.data import images
    spec = {**images.DATASETS["mnist"], "mirrors": [(tmp_path / "nowhere").as_uri() + "/"],
            "system_dir": str(tmp_path / "absent")}
    monkeypatch.setitem(images.DATASETS, "mnist", spec)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError, match=r"train-images-idx3-ubyte.gz is in none of .*could not be downloaded"):
        load_images("mnist", "train", tmp_path / "mine")
