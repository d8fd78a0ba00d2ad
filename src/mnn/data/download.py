"""Downloads that are checked before they are kept: sha256, then an atomic rename."""
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm


class ChecksumError(ValueError):
    """A downloaded file whose sha256 is not the published one."""


def cache_dir():
    """mnn's cache: $MNN_CACHE, else $XDG_CACHE_HOME/mnn, else ~/.cache/mnn."""
    if os.environ.get("MNN_CACHE"):
        return Path(os.environ["MNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnn"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path, write):
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place.

    A crash midway leaves any previous ``path`` intact and no partial file under its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def download(url, path, sha256):
    """Fetch ``url`` to ``path``; keep it only if its sha256 matches."""
    path = Path(path)

    def fetch(handle):
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}", leave=False) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(f"{url}: sha256 {actual} does not match the expected {sha256}; file discarded")

    atomic_write(path, fetch)
    return path
