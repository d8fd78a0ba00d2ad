"""Fashion-MNIST and MNIST: find the IDX files, read them, normalise them."""
from dataclasses import dataclass
from pathlib import Path

import numpy

from .download import cache_dir, download
from .idx import read_idx

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

DATASETS = {
    "fashion-mnist": {
        "mirrors": ["https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
                    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "system_dir": "/usr/share/datasets/fashion-mnist",
        "sha256": {
            "train_images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train_labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "test_images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "test_labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
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
        "classes": [str(digit) for digit in range(10)],
    },
}


def locate(name, data_dir=None, mirrors=None):
    """Paths of the four files: ``data_dir``, then the cache, then the system folder, else download.

    A folder counts only if it holds all four files. Downloads go to the cache, checked
    against the published sha256 and written atomically.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    spec = DATASETS[name]
    cache = cache_dir() / name
    folders = [folder for folder in [data_dir, cache, spec["system_dir"]] if folder]
    for folder in folders:
        if all((Path(folder) / f).is_file() for f in FILES.values()):
            return {key: Path(folder) / f for key, f in FILES.items()}
    return {key: fetch(spec, key, cache, mirrors, folders) for key in FILES}


def fetch(spec, key, cache, mirrors, searched):
    path = cache / FILES[key]
    if path.is_file():
        return path
    errors = []
    for mirror in mirrors or spec["mirrors"]:
        try:
            return download(mirror + FILES[key], path, spec["sha256"][key])
        except OSError as error:
            errors.append(f"{mirror}: {error}")
    raise ConnectionError(f"{FILES[key]} is in none of {', '.join(map(str, searched))} and could not be "
                          "downloaded (on Debian: apt-get install dataset-fashion-mnist):\n  " + "\n  ".join(errors))


@dataclass
class ImageDataset:
    """uint8 images (N, 1, 28, 28) and int64 labels, with the class names."""

    images: numpy.ndarray
    labels: numpy.ndarray
    classes: list

    def __len__(self):
        return len(self.labels)


def load_images(name="fashion-mnist", split="train", data_dir=None):
    """The training or test split of Fashion-MNIST or MNIST."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = locate(name, data_dir)
    images = read_idx(paths[f"{split}_images"])
    labels = read_idx(paths[f"{split}_labels"]).astype(numpy.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{name} {split}: images {images.shape} and labels {labels.shape} do not pair up")
    return ImageDataset(images[:, None], labels, DATASETS[name]["classes"])


@dataclass
class Normalizer:
    r"""$x \mapsto (x / 255 - \mu) / \sigma$ with $\mu, \sigma$ from the training images."""

    mean: float
    std: float

    @classmethod
    def fit(cls, images):
        scaled = images.astype(numpy.float64) / 255
        return cls(float(scaled.mean()), float(scaled.std()))

    def __call__(self, images, dtype=numpy.float32):
        return ((images.astype(dtype) / 255 - dtype(self.mean)) / dtype(self.std)).astype(dtype)
