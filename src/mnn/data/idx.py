"""The IDX format of the MNIST family: a magic number, big-endian dimensions, raw data.

Bytes 0-1 are zero, byte 2 gives the element type, byte 3 the number of dimensions;
then one big-endian uint32 per dimension, then the values in C order.

The header says how many bytes follow, so a file is read (and decompressed) up to that
size and no further: a small gzip file that inflates to gigabytes is refused after the
declared size, not after filling the memory.
"""
import gzip
import hashlib
import math
import zlib

import numpy

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_BYTES = 1 << 30  # the largest file a header may declare: a hostile header allocates no more
MAX_DIMENSIONS = 8  # images have 3, labels 1; NumPy itself takes no more than 64
CHUNK = 1 << 20


class IdxError(ValueError):
    """A file that is not valid IDX: wrong magic, truncated, or the wrong size."""


def open_stream(path):
    """The file as a binary stream, decompressed as it is read if it is gzip (by content, not by name)."""
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_idx_and_digest(path, max_bytes=MAX_IDX_BYTES):
    """An IDX file (raw or .gz) as a NumPy array, and the sha256 of its IDX bytes (after decompression).

    Nothing past the size the header declares is decompressed; a header that declares more
    than ``max_bytes`` is refused before anything is allocated.
    """
    try:
        with open_stream(path) as stream:
            return read_stream(stream, path, max_bytes)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({error})") from error


def read_idx(path, max_bytes=MAX_IDX_BYTES):
    """Read an IDX file (raw or .gz) into a NumPy array."""
    return read_idx_and_digest(path, max_bytes)[0]


def read_stream(stream, path, max_bytes):
    digest = hashlib.sha256()
    magic = read_up_to(stream, 4, digest)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_TYPES:
        raise IdxError(f"{path}: not an IDX file (magic bytes {magic.hex() or 'missing'})")
    ndim, dtype = magic[3], numpy.dtype(IDX_TYPES[magic[2]])
    if ndim > MAX_DIMENSIONS:
        raise IdxError(f"{path}: IDX header declares {ndim} dimensions, more than the {MAX_DIMENSIONS} accepted "
                       "(a corrupt or hostile header)")
    dims = read_up_to(stream, 4 * ndim, digest)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise IdxError(f"{path}: IDX header declares {ndim} dimensions but the file ends at byte {4 + len(dims)}")
    shape = tuple(int(d) for d in numpy.frombuffer(dims, ">u4"))
    header = 4 + 4 * ndim
    expected = header + math.prod(shape) * dtype.itemsize
    sized = header + math.prod(max(size, 1) for size in shape) * dtype.itemsize  # a 0 beside huge sizes: refused too
    if sized > max_bytes:
        raise IdxError(f"{path}: IDX header declares shape {shape}, {sized} bytes, more than the "
                       f"{max_bytes} accepted (a corrupt or hostile header)")
    body = read_up_to(stream, expected - header, digest)
    if header + len(body) < expected:
        raise IdxError(f"{path}: IDX shape {shape} needs {expected} bytes, file has {header + len(body)} "
                       "(truncated or corrupt)")
    if stream.read(1):
        raise IdxError(f"{path}: IDX shape {shape} needs {expected} bytes, the file holds more (corrupt)")
    array = numpy.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return array, digest.hexdigest()


def read_up_to(stream, size, digest):
    """Up to ``size`` bytes of ``stream`` (fewer where it ends), read in chunks and added to ``digest``."""
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(min(remaining, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        digest.update(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_idx(path, array, compress=None):
    """Write ``array`` as IDX (gzip when the name ends in .gz); used by tests and tools."""
    codes = {numpy.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + numpy.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(numpy.dtype(IDX_TYPES[code])).tobytes()
    if compress if compress is not None else str(path).endswith(".gz"):
        data = gzip.compress(data)
    with open(path, "wb") as handle:
        handle.write(data)
