"""Fashion-MNIST and MNIST: find the IDX files, read and check them, normalise them."""
from dataclasses import dataclass
from pathlib import Path

import numpy

from .download import ChecksumError, cache_dir, download_from_mirrors
from .idx import read_idx_and_digest

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IMAGE_SIZE = (28, 28)
MAX_FILE_BYTES = 64 << 20  # the largest of the four, the training images, holds 47,040,016 bytes

# "sha256": the published .gz files, checked when they are downloaded.
# "idx_sha256": the IDX bytes inside them, checked whenever a file is read, wherever it came from:
# a copy compressed again (Debian's) or not compressed passes, another data set's file does not.
DATASETS = {
    "fashion-mnist": {
        "mirrors": ["https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "system_dir": "/usr/share/datasets/fashion-mnist",
        "debian_package": "dataset-fashion-mnist",
        "sha256": {
            "train_images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train_labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "test_images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "test_labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
        "idx_sha256": {
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    },
    "mnist": {
        "mirrors": ["https://storage.googleapis.com/cvdf-datasets/mnist/",
                    "https://ossci-datasets.s3.amazonaws.com/mnist/"],
        "system_dir": "/usr/share/datasets/mnist",
        "sha256": {
            "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
        "idx_sha256": {
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        "classes": [str(digit) for digit in range(10)],
    },
}


def locate(name, data_dir=None, mirrors=None):
    """Paths of the four files: in ``data_dir`` if it is given, else in the cache, else in the
    system folder, else downloaded into the cache.

    A given ``data_dir`` must hold all four files: one that does not is an error, never a
    reason to look elsewhere. Downloads are checked against the published sha256 and written
    atomically; the files' contents are checked when they are read (``load_images``).
    """
    spec = dataset_spec(name)
    if data_dir is not None:
        return files_in_given_folder(Path(data_dir), name)
    cache = cache_dir() / name
    searched = [cache, Path(spec["system_dir"])]
    for folder in searched:
        if not missing_files(folder):
            return {key: folder / file for key, file in FILES.items()}
    return {key: fetch(name, key, cache, mirrors or spec["mirrors"], searched) for key in FILES}


def dataset_spec(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def missing_files(folder):
    return [file for file in FILES.values() if not (folder / file).is_file()]


def files_in_given_folder(folder, name):
    if not folder.exists():
        raise FileNotFoundError(f"data folder {folder} (--data-dir) does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"data folder {folder} (--data-dir) is not a folder")
    missing = missing_files(folder)
    if missing:
        raise FileNotFoundError(f"data folder {folder} (--data-dir) lacks {', '.join(missing)} of {name}; "
                                f"{how_to_get(name)}")
    return {key: folder / file for key, file in FILES.items()}


def how_to_get(name):
    spec = DATASETS[name]
    package = f"on Debian: apt-get install {spec['debian_package']}, or " if spec.get("debian_package") else ""
    return (f"to get {name}: {package}put the four files from {' or '.join(spec['mirrors'])} in a folder "
            "and give it with --data-dir")


def fetch(name, key, cache, mirrors, searched):
    path = cache / FILES[key]
    if path.is_file():
        return path
    try:
        return download_from_mirrors(mirrors, FILES[key], path, DATASETS[name]["sha256"][key])
    except ConnectionError as error:
        raise ConnectionError(f"{FILES[key]} is in none of {', '.join(map(str, searched))}; {error}; "
                              f"{how_to_get(name)}") from error


@dataclass
class ImageDataset:
    """Images (N, C, H, W) of raw pixel values in [0, 255] (uint8, or float32 where a data set
    stores fractions), int64 labels in [0, len(classes)), and the class names."""

    images: numpy.ndarray
    labels: numpy.ndarray
    classes: list

    def __len__(self):
        return len(self.labels)


def load_images(name="fashion-mnist", split="train", data_dir=None):
    """The training or test split of Fashion-MNIST or MNIST, checked as it is read.

    The images must be 28 x 28, finite and not blank; the labels integers in [0, number of
    classes), one per image; and each file's contents the published ones (its sha256 is
    computed in the same pass that reads and decompresses it).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = locate(name, data_dir)
    image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
    images, image_digest = read_idx_and_digest(image_path, MAX_FILE_BYTES)
    labels, label_digest = read_idx_and_digest(label_path, MAX_FILE_BYTES)
    check_images(images, image_path)
    check_labels(labels, label_path, len(DATASETS[name]["classes"]))
    if len(labels) != len(images):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    check_published(image_path, image_digest, name, f"{split}_images")
    check_published(label_path, label_digest, name, f"{split}_labels")
    return ImageDataset(images[:, None], labels.astype(numpy.int64), DATASETS[name]["classes"])


def check_published(path, digest, name, key):
    """The file at ``path``, whose IDX contents hash to ``digest``, must be data set ``name``'s ``key`` file."""
    expected = DATASETS[name]["idx_sha256"][key]
    if digest != expected:
        raise ChecksumError(f"{path} is not {name}'s {key.replace('_', ' ')} file: the sha256 of its IDX "
                            f"contents is {digest}, not {expected}{identify(digest)}")


def identify(digest):
    """Which known file has these contents, if any: a hint for the error message."""
    for name, spec in DATASETS.items():
        for key, known in spec["idx_sha256"].items():
            if known == digest:
                return f" (it is {name}'s {key.replace('_', ' ')} file)"
    return ""


def check_images(images, path):
    if images.ndim != 3 or images.shape[1:] != IMAGE_SIZE:
        raise ValueError(f"{path}: expected images of {IMAGE_SIZE[0]} x {IMAGE_SIZE[1]} pixels, "
                         f"found an array of shape {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{path} holds no images")
    if images.dtype.kind == "f" and not numpy.isfinite(images).all():
        raise ValueError(f"{path}: {numpy.count_nonzero(~numpy.isfinite(images))} pixels are NaN or infinite")
    if images.min() == images.max():
        raise ValueError(f"{path}: every pixel of every image is {images.flat[0]}: blank images")


def check_labels(labels, path, classes):
    if labels.ndim != 1:
        raise ValueError(f"{path}: expected one label per image, found an array of shape {labels.shape}")
    if not numpy.issubdtype(labels.dtype, numpy.integer):
        raise ValueError(f"{path}: labels must be integers, found {labels.dtype}")
    outside = numpy.flatnonzero((labels < 0) | (labels >= classes))
    if len(outside):
        raise ValueError(f"{path}: label {labels[outside[0]]} at index {outside[0]} is not a class in "
                         f"[0, {classes}) ({len(outside)} such labels)")


@dataclass
class Normalizer:
    r"""$x \mapsto (x / 255 - \mu) / \sigma$ with $\mu, \sigma$ from the training images.

    Grey images get one $\mu$ and one $\sigma$ (two numbers, as mnn has always stored them);
    images of several channels one of each per channel (lists), as colour photographs need:
    their red, green and blue planes differ in brightness and spread.
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, images):
        """The statistics of ``images`` (N, C, H, W): per channel when C > 1."""
        if images.min() == images.max():  # sigma = 0: dividing by it would make every input NaN
            raise ValueError(f"cannot normalise {len(images)} images whose pixels all equal {images.flat[0]}")
        if images.ndim == 4 and images.shape[1] > 1:
            mean, std = channel_statistics(images)
            constant = numpy.flatnonzero(std == 0)
            if len(constant):
                raise ValueError(f"cannot normalise channel {constant[0]} of {len(images)} images: every pixel in "
                                 f"it equals {images[0, constant[0]].flat[0]}")
            return cls(mean.tolist(), std.tolist())
        scaled = images.astype(numpy.float64) / 255
        return cls(float(scaled.mean()), float(scaled.std()))

    @property
    def channels(self):
        """How many channels the statistics are for (None: one pair for all)."""
        return len(self.mean) if isinstance(self.mean, (list, tuple)) else None

    def __call__(self, images, dtype=numpy.float32):
        if self.channels is None:
            mean, std = dtype(self.mean), dtype(self.std)
        else:  # shaped (C, 1, 1): broadcast over (N, C, H, W)
            mean, std = (numpy.asarray(v, dtype).reshape(-1, 1, 1) for v in (self.mean, self.std))
        return ((images.astype(dtype) / 255 - mean) / std).astype(dtype)


def channel_statistics(images, chunk=2048):
    """Per-channel mean and standard deviation of ``images / 255`` (N, C, H, W), in float64.

    Two passes over chunks of images, so no float64 copy of the whole set is made (CIFAR-10's
    training images would take 1.2 GB)."""
    count = images.shape[0] * images.shape[2] * images.shape[3]
    total = numpy.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        total += (images[start:start + chunk].astype(numpy.float64) / 255).sum(axis=(0, 2, 3))
    mean = total / count
    squares = numpy.zeros(images.shape[1])
    for start in range(0, len(images), chunk):
        centred = images[start:start + chunk].astype(numpy.float64) / 255 - mean[:, None, None]
        squares += (centred * centred).sum(axis=(0, 2, 3))
    return mean, numpy.sqrt(squares / count)
