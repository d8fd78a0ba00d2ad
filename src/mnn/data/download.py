"""Downloads that are checked before they are kept: sha256, then an atomic rename."""
import hashlib
import http.client
import os
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..files import Progress, atomic_write, one_line

READ_TIMEOUT = 60  # seconds one read may wait for the server (the default; download() takes others)
DEADLINE = 600  # seconds the whole download may take


class ChecksumError(ValueError):
    """A file whose sha256 is not the published one."""


class DownloadTimeout(TimeoutError):
    """A download still unfinished at its deadline (a server that trickles bytes)."""


def cache_dir():
    """mnn's cache: ``$MNN_CACHE``, else ``$XDG_CACHE_HOME/mnn``, else ``~/.cache/mnn``."""
    if os.environ.get("MNN_CACHE"):
        return Path(os.environ["MNN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnn"


def file_digest(path, algorithm="sha256"):
    """The hex digest of a file's bytes (sha256 unless another hashlib ``algorithm`` is named)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, sha256, deadline=None, read_timeout=None, quiet=False):
    """Fetch ``url`` to ``path`` within ``deadline`` seconds; keep it only if its sha256 matches.

    ``read_timeout`` bounds each wait for the server, ``deadline`` the whole transfer (by
    default the module's READ_TIMEOUT and DEADLINE): a server that sends one byte at a time
    passes every read but not the deadline, which is checked after each read, so it is
    overshot by at most one ``read_timeout``. A progress bar shows unless ``quiet``.
    """
    path = Path(path)
    deadline, read_timeout = deadline or DEADLINE, read_timeout or READ_TIMEOUT
    give_up_at = time.monotonic() + deadline

    def fetch(handle):
        digest, received = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=read_timeout) as response:
            total = declared_length(response)
            read_some = getattr(response, "read1", response.read)  # read1: what has arrived, not a full chunk
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}", leave=False,
                      disable=quiet, file=Progress()) as bar:
                for chunk in iter(lambda: read_some(1 << 16), b""):
                    if time.monotonic() > give_up_at:
                        raise DownloadTimeout(f"{url}: download unfinished after {deadline:g} s "
                                              f"({received} bytes received); file discarded")
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total and received < total:
            raise ConnectionError(f"{url}: the server sent {received} of {total} bytes; file discarded")
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(f"{url}: sha256 {actual} does not match the expected {sha256}; file discarded")

    try:
        atomic_write(path, fetch)
    except ChecksumError:
        raise
    except (http.client.HTTPException, ValueError) as error:  # a malformed answer or redirect, which is no OSError
        raise ConnectionError(f"{url}: bad answer from the server ({one_line(repr(error))}); file discarded") from error
    return path


def declared_length(response):
    """The Content-Length the server declared, or None where it declared none (or no number)."""
    text = (response.headers.get("Content-Length") or "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def download_from_mirrors(mirrors, name, path, sha256, **options):
    """Download ``name`` from the first of ``mirrors`` (URL prefixes) that serves it with the right sha256.

    A mirror that fails, times out or serves other bytes is passed over for the next one;
    when none serves it, a ConnectionError lists what each mirror did. ``options`` go to
    ``download`` (deadline, read_timeout, quiet).
    """
    failures = []
    for mirror in mirrors:
        try:
            return download(mirror + name, path, sha256, **options)
        except (OSError, ChecksumError) as error:
            failures.append(with_url(error, mirror + name))
    raise ConnectionError(f"{name} could not be downloaded from any mirror: {'; '.join(failures)}")


def with_url(error, url):
    """The error's message on one line (urllib's redirect errors span several), naming ``url``."""
    message = one_line(error)
    return message if url in message else f"{url}: {message}"
