"""Text for the character-level GPT: Tiny Shakespeare and a character tokenizer."""
from pathlib import Path

import numpy

from .download import cache_dir, download, sha256_of

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FILE_NAMES = ("tinyshakespeare.txt", "input.txt")


def locate_text(path=None, url=TINY_SHAKESPEARE_URL, sha256=TINY_SHAKESPEARE_SHA256):
    """A text file: ``path`` (a file, or a folder holding tinyshakespeare.txt or input.txt),
    else mnn's cache, else downloaded into the cache and checked against ``sha256``."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        candidates = [path] if path.is_file() else [path / name for name in FILE_NAMES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no text at {path} (looked for {', '.join(map(str, candidates))})")
        return found
    cached = cache_dir() / "tinyshakespeare" / FILE_NAMES[0]
    if cached.is_file() and sha256_of(cached) == sha256:
        return cached
    try:
        return download(url, cached, sha256)
    except OSError as error:
        raise ConnectionError(f"Tiny Shakespeare is not in {cached.parent} and could not be downloaded from "
                              f"{url} ({error}); give its path with --data-dir") from error


class CharTokenizer:
    """One token per distinct character, numbered in sorted order (as nanoGPT's shakespeare_char)."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}; "
                             f"the vocabulary is {self.chars!r}")
        return numpy.array([self.index[c] for c in text], dtype=numpy.int64)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def load_text(path=None):
    return locate_text(path).read_text(encoding="utf-8")
