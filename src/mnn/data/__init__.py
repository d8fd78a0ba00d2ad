"""Datasets: IDX images (Fashion-MNIST, MNIST), Tiny Shakespeare, downloads, batches."""
from .download import ChecksumError, DownloadTimeout, cache_dir, download, download_from_mirrors
from .idx import IdxError, read_idx, read_idx_and_digest, write_idx
from .images import DATASETS, ImageDataset, Normalizer, load_images, locate

__all__ = ["ChecksumError", "DownloadTimeout", "cache_dir", "download", "download_from_mirrors", "IdxError",
           "read_idx", "read_idx_and_digest", "write_idx", "DATASETS", "ImageDataset", "Normalizer", "load_images",
           "locate"]
