"""Datasets: IDX images (Fashion-MNIST, MNIST), CIFAR-10, your own images, Tiny Shakespeare, downloads, batches."""
from .cifar import load_cifar10
from .custom import load_custom
from .download import ChecksumError, DownloadTimeout, cache_dir, download, download_from_mirrors
from .idx import IdxError, read_idx, read_idx_and_digest, write_idx
from .images import DATASETS, ImageDataset, Normalizer, load_images, locate

__all__ = ["ChecksumError", "DownloadTimeout", "cache_dir", "download", "download_from_mirrors", "IdxError",
           "read_idx", "read_idx_and_digest", "write_idx", "DATASETS", "ImageDataset", "Normalizer", "load_images",
           "locate", "load_cifar10", "load_custom"]
