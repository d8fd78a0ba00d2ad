"""The IDX format of the MNIST family: a magic number, big-endian dimensions, raw data.

Bytes 0-1 are zero, byte 2 gives the element type, byte 3 the number of dimensions;
then one big-endian uint32 per dimension, then the values in C order.
"""
import gzip
import zlib

import numpy

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """A file that is not valid IDX: wrong magic, truncated, or the wrong size."""


def read_bytes(path):
    """The file's bytes, decompressed if it is gzip (by content, not by name)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        raise IdxError(f"{path}: corrupt or truncated gzip data ({error})") from error


def parse_idx(data, path="<bytes>"):
    """Parse IDX bytes into a NumPy array, checking magic, dimensions and size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise IdxError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxError(f"{path}: IDX header declares {ndim} dimensions but the file ends at byte {len(data)}")
    shape = tuple(int(d) for d in numpy.frombuffer(data, ">u4", ndim, offset=4))
    dtype = numpy.dtype(IDX_TYPES[data[2]])
    expected = header + int(numpy.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise IdxError(f"{path}: IDX shape {shape} needs {expected} bytes, file has {len(data)} (truncated or corrupt)")
    return numpy.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file (raw or .gz) into a NumPy array."""
    return parse_idx(read_bytes(path), path)


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
