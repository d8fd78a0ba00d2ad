"""CIFAR-10, from its official binary version: find it, download it, read and check it.

``cifar-10-binary.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html) holds, in
``cifar-10-batches-bin/``, ``data_batch_1.bin`` .. ``data_batch_5.bin`` (training) and
``test_batch.bin``: 10,000 records each of 1 label byte (0-9) and 3,072 pixel bytes, the red,
green and blue planes of a 32 x 32 image, row by row; and ``batches.meta.txt``, the ten class
names, one a line.

What is checked, and against what:

- The archive, whenever it is read (downloaded or found): its MD5 against the one the
  authors publish on that page, ``c32a1d4ab5d03f1284b67883e8d87530``, and its SHA-256
  against ``c4a38c50...a1dd``, which the authors do not publish: it is the value that
  JuliaML/MLDatasets.jl and gomlx/gomlx pin for this URL (170,052,171 bytes), and it was not
  verified here (no copy of the file was at hand). Both are computed in one pass over the
  archive before anything in it is decompressed (a small file that inflates to gigabytes is
  refused at once); a download is kept only if its SHA-256 matches, then only if its MD5 does.
- An extracted folder (``cifar-10-batches-bin/`` or its files) has no published checksums:
  only its structure is checked.
- Always: each batch holds exactly 10,000 whole records, every label is a class in 0-9, the
  images are not blank, and ``batches.meta.txt`` names ten distinct classes.

The archive is read as a stream, never extracted: only the seven expected regular files are
read, each no further than its expected size.
"""
import hashlib
import tarfile
from pathlib import Path

import numpy

from ..files import one_line
from .download import ChecksumError, cache_dir, download_from_mirrors, file_digest
from .images import ImageDataset, check_labels

ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published by the authors
SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"  # MLDatasets.jl's and gomlx's; unverified
SPLITS = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
META = "batches.meta.txt"
SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32
RECORDS_PER_BATCH = 10_000
CLASSES = 10
MAX_META_BYTES = 4096


def how_to_get():
    return (f"put {ARCHIVE} from {MIRRORS[0]} (or its extracted {FOLDER} folder) in a folder and give it with "
            "--data-dir")


def locate(data_dir=None, mirrors=None):
    """The archive, or a folder of the extracted files: in ``data_dir`` if given, else in the cache,
    else downloaded into the cache. A given ``data_dir`` that lacks them is an error."""
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.exists():
            raise FileNotFoundError(f"data folder {folder} (--data-dir) does not exist")
        if not folder.is_dir():
            raise NotADirectoryError(f"data folder {folder} (--data-dir) is not a folder")
        found = found_in(folder)
        if found is None:
            raise FileNotFoundError(f"data folder {folder} (--data-dir) holds neither {ARCHIVE} nor the files of "
                                    f"{FOLDER}; to get CIFAR-10: {how_to_get()}")
        return found
    cache = cache_dir() / "cifar10"
    found = found_in(cache)
    if found is not None:
        return found
    path = cache / ARCHIVE
    try:
        download_from_mirrors(mirrors or MIRRORS, ARCHIVE, path, SHA256)
    except ConnectionError as error:
        raise ConnectionError(f"{ARCHIVE} is not in {cache}; {error}; to get CIFAR-10: {how_to_get()}") from error
    md5 = file_digest(path, "md5")
    if md5 != MD5:
        path.unlink()
        raise ChecksumError(f"{path}: MD5 {md5} is not the published {MD5}; file discarded")
    return path


def found_in(folder):
    """``folder``'s archive, or the folder that holds the extracted files, or None."""
    if (folder / ARCHIVE).is_file():
        return folder / ARCHIVE
    for candidate in (folder / FOLDER, folder):
        names = [*SPLITS["train"], *SPLITS["test"], META]
        if all((candidate / name).is_file() for name in names):
            return candidate
    return None


def load_cifar10(split="train", data_dir=None):
    """The training (50,000 images) or test (10,000) split as uint8 (N, 3, 32, 32), checked."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    source = locate(data_dir)
    files = read_archive(source, SPLITS[split]) if source.is_file() else read_folder(source, SPLITS[split])
    classes = class_names(files[META], source / META if source.is_dir() else f"{source}: {FOLDER}/{META}")
    images, labels = [], []
    for name in SPLITS[split]:
        where = source / name if source.is_dir() else f"{source}: {FOLDER}/{name}"
        batch_images, batch_labels = records(files[name], where)
        images.append(batch_images)
        labels.append(batch_labels)
    images, labels = numpy.concatenate(images), numpy.concatenate(labels)
    if images.min() == images.max():
        raise ValueError(f"{source}: every pixel of every {split} image is {images.flat[0]}: blank images")
    return ImageDataset(images, labels, classes)


def records(data, where):
    """(images (N, 3, 32, 32), labels) of one batch file's bytes."""
    expected = RECORDS_PER_BATCH * RECORD
    if len(data) != expected:
        raise ValueError(f"{where}: {len(data):,} bytes; a CIFAR-10 batch holds {RECORDS_PER_BATCH:,} records of "
                         f"{RECORD:,} bytes ({expected:,} bytes)")
    table = numpy.frombuffer(data, numpy.uint8).reshape(RECORDS_PER_BATCH, RECORD)
    labels = table[:, 0].astype(numpy.int64)
    check_labels(labels, where, CLASSES)
    return table[:, 1:].reshape(-1, *SHAPE), labels


def class_names(data, where):
    """The ten class names of ``batches.meta.txt``, one a line (read one byte past the size allowed)."""
    if len(data) > MAX_META_BYTES:
        raise ValueError(f"{where}: longer than the {MAX_META_BYTES} bytes ten class names take")
    try:
        names = [line.strip() for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not text ({error})") from error
    if len(names) != CLASSES or len(set(names)) != CLASSES:
        raise ValueError(f"{where}: expected {CLASSES} distinct class names, one a line; found {len(names)} lines "
                         f"({len(set(names))} distinct)")
    return names


def read_folder(folder, names):
    """The bytes of ``names`` and of the class-name file, each read no further than its expected size."""
    files = {}
    for name in [*names, META]:
        limit = MAX_META_BYTES if name == META else RECORDS_PER_BATCH * RECORD
        with open(folder / name, "rb") as handle:
            files[name] = handle.read(limit + 1)  # one byte more shows a file that is too long
    return files


def check_published(path):
    """Refuse an archive whose MD5 or SHA-256 is not the published one (both in one pass)."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    if md5.hexdigest() != MD5 or sha256.hexdigest() != SHA256:
        raise ChecksumError(f"{path} is not the published {ARCHIVE}: MD5 {md5.hexdigest()} (published: {MD5}), "
                            f"SHA-256 {sha256.hexdigest()} (expected {SHA256})")


def read_archive(path, names):
    """The bytes of ``names`` and of the class-name file from the archive, read as a stream once the
    archive is known to be the published one (its checksums, in a first pass that decompresses nothing)."""
    check_published(path)
    wanted = {f"{FOLDER}/{name}": name for name in [*names, META]}
    files = {}
    with open(path, "rb") as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|gz") as archive:
                for member in archive:
                    name = wanted.get(member.name)
                    if name is None or not member.isfile() or name in files:
                        continue
                    limit = MAX_META_BYTES if name == META else RECORDS_PER_BATCH * RECORD
                    files[name] = archive.extractfile(member).read(limit + 1)
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ValueError(f"{path}: not a readable .tar.gz ({one_line(error)})") from error
    missing = [name for name in wanted.values() if name not in files]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(f'{FOLDER}/{name}' for name in missing)}")
    return files
