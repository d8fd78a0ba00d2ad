"""Text for the character-level GPT: Tiny Shakespeare (shipped with mnn) and a character tokenizer."""
import codecs
import functools
from pathlib import Path

import numpy

from ..files import kind_of
from .download import ChecksumError, cache_dir, download, file_digest

SHIPPED_TEXT = Path(__file__).with_name("tinyshakespeare.txt")  # package data: no download, works offline
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FILE_NAMES = ("tinyshakespeare.txt", "input.txt")


def locate_text(path=None, url=None, sha256=None):
    """A text file: ``path`` (a file, or a folder holding tinyshakespeare.txt or input.txt); else,
    given ``url``, a copy downloaded into mnn's cache and checked against ``sha256``; else the
    Tiny Shakespeare shipped with mnn."""
    if path is not None:
        return text_file_at(Path(path))
    if url is not None:
        return downloaded_text(url, sha256)
    return shipped_text()


def text_file_at(path):
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not (path.is_file() or path.is_dir()):  # read twice (the text, then its checks): a pipe would be empty
        raise ValueError(f"{path}: {kind_of(path.stat().st_mode)}, not a regular file; a text is a UTF-8 file "
                         "(save what a pipe gives to a file first)")
    candidates = [path] if path.is_file() else [path / name for name in FILE_NAMES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no text at {path} (looked for {', '.join(map(str, candidates))})")
    return found


def downloaded_text(url, sha256):
    """The text at ``url``, kept in the cache under its sha256, which is checked on download and on reuse."""
    if not sha256:
        raise ValueError(f"a text downloaded from {url} needs its sha256, to be checked")
    cached = cache_dir() / "text" / f"{sha256}.txt"
    if cached.is_file() and file_digest(cached) == sha256:
        return cached
    try:
        return download(url, cached, sha256)
    except OSError as error:
        raise ConnectionError(f"{url} could not be downloaded into {cached.parent} ({error}); "
                              "give the text file with --data-dir") from error


@functools.cache
def shipped_text():
    """The Tiny Shakespeare installed with mnn, its sha256 checked once per process."""
    if not SHIPPED_TEXT.is_file():
        raise FileNotFoundError(f"the Tiny Shakespeare that comes with mnn is missing ({SHIPPED_TEXT}): "
                                "reinstall mnn, or give a text file with --data-dir")
    actual = file_digest(SHIPPED_TEXT)
    if actual != TINY_SHAKESPEARE_SHA256:
        raise ChecksumError(f"the Tiny Shakespeare that comes with mnn is damaged ({SHIPPED_TEXT}: sha256 {actual}, "
                            f"expected {TINY_SHAKESPEARE_SHA256}): reinstall mnn, or give a text file with --data-dir")
    return SHIPPED_TEXT


def read_text(path):
    """The UTF-8 text in ``path``, without the byte-order mark some editors put first, and with each
    line ending a newline (Windows' CR LF and old Macs' CR), as Python's text files read it: a CR
    would otherwise be a character of its own to learn and to print; an empty file or one that is
    not UTF-8 is an error that names it."""
    data = Path(path).read_bytes()
    mark = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[mark:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: byte {error.object[error.start]:#04x} at offset "
                         f"{mark + error.start} ({error.reason})") from error
    if not text:
        raise ValueError(f"{path} is empty: no text to learn from")
    return newlines(text)


def newlines(text):
    """Each line ending as a newline: Windows' CR LF and old Macs' CR (texts and prompts alike)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
    """The text at ``path`` (see ``locate_text``), or the shipped Tiny Shakespeare."""
    return read_text(locate_text(path))
