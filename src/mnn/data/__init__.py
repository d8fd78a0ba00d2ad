"""Datasets: IDX images (Fashion-MNIST, MNIST), Tiny Shakespeare, downloads, batches."""
from .download import ChecksumError, cache_dir, download
from .idx import IdxError, read_idx, write_idx
from .images import DATASETS, ImageDataset, Normalizer, load_images, locate

__all__ = ["ChecksumError", "cache_dir", "download", "IdxError", "read_idx", "write_idx", "DATASETS",
           "ImageDataset", "Normalizer", "load_images", "locate"]
