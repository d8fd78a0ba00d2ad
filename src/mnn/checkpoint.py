"""Checkpoints: tensors in safetensors format, everything else as JSON. No pickle, ever.

One file holds the parameters (``param/<name>``), the optimizer's buffers
(``optim/<name>``) and a JSON document in the safetensors header: the architecture
(so the checkpoint rebuilds its own network), the mnn version, and whatever the
trainer adds (normalisation, optimizer settings, step, RNG state, metrics).
Writes are atomic: a temporary file, fsync, rename, fsync of the folder. The file gets
the mode any new file gets under the umask, and a later save removes the temporary files
that a save killed midway left behind.

Reading trusts nothing in the file, and checks it in this order before building anything:

1. the path is a regular file (not a FIFO, a device, a socket or a folder), read no
   further than its size;
2. the header has a sane length and is JSON listing floating-point tensors named
   ``param/...`` or ``optim/...``;
3. the document fits the schema in ``checkpoint_schema`` (types, ranges, nesting);
4. the architecture's parameter count equals the number of values the ``param/`` tensors
   hold, so what gets built is no bigger than the file;
5. every tensor loads and holds finite numbers.

Every failure is a ``CheckpointError`` on one line naming the file and the field.
Weights and optimizer state take the network's dtype: a float16 checkpoint loaded into a
float32 network gives float32 weights and float32 moments.
"""
import json
import math
import os
import stat
from collections import Counter
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from . import __version__, backend, models
from .checkpoint_schema import FieldError, check_document, check_resume_document, choice, integer, list_of, record
from .files import atomic_write, kind_of, one_line, remove_stale_temporaries

PICKLE_SIGNATURES = (b"\x80", b"PK\x03\x04")  # a pickle protocol header, or torch.save's zip
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself applies
FLOAT_DTYPES = ("F16", "F32", "F64")  # the floating-point types NumPy holds (not BF16, not 8-bit floats)
TENSOR_ENTRY = record({"dtype": choice(*FLOAT_DTYPES), "shape": list_of(integer(0), max_length=32),
                       "data_offsets": list_of(integer(0), 2, 2)})


class CheckpointError(ValueError):
    """A file that is not a valid mnn checkpoint, or does not fit the network."""


# -- writing ----------------------------------------------------------------
def save_checkpoint(path, net, architecture, optimizer=None, **metadata):
    """Write ``net``'s parameters, the optimizer state and JSON metadata to ``path`` atomically.

    ``architecture`` names one of ``mnn.models``' builders and its settings, from which the checkpoint
    rebuilds its network; a network of your own is saved with ``save_weights``."""
    path = Path(path)
    tensors = {f"param/{name}": backend.to_numpy(p) for name, p in net.state_dict().items()}
    check_architecture(architecture, sum(tensor.size for tensor in tensors.values()))
    document = {"mnn_version": __version__, "architecture": architecture, **metadata}
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors.update({f"optim/{k}": backend.to_numpy(v) for k, v in state["buffers"].items()})
        document["optimizer"] = {"name": type(optimizer).__name__, "settings": state["settings"]}
    data = save_safetensors({k: numpy.ascontiguousarray(v) for k, v in tensors.items()},
                            metadata={"mnn": json.dumps(document)})
    remove_stale_temporaries(path)
    return atomic_write(path, lambda handle: handle.write(data))


def check_architecture(architecture, held):
    """Refuse, at saving, what no load could take: an architecture that is not one of ``mnn.models``'
    (with nothing but ``name`` and ``kwargs``), or one that describes another size than the ``held``
    values of the network's parameters and buffers."""
    try:
        if not isinstance(architecture, dict) or not set(architecture) <= {"name", "kwargs"}:
            raise ValueError(f"must be a dict of a model's name and kwargs, got {architecture!r}")
        described = models.parameter_count(architecture, buffers=True)
    except (ValueError, FieldError) as error:
        raise ValueError(f"architecture: {one_line(error)}. A checkpoint rebuilds one of mnn.models' networks "
                         f"({', '.join(sorted(models.BUILDERS))}); save a network of your own with "
                         "mnn.checkpoint.save_weights(path, net)") from error
    if described != held:
        raise ValueError(f"architecture: describes {described:,} parameters and buffers, but the network holds "
                         f"{held:,}: not the network it describes")


def save_weights(path, net):
    """Write ``net.state_dict()`` (a network's parameters and buffers, by name) to a safetensors file,
    atomically.

    For a network of your own, which no checkpoint architecture describes: build the same
    network again and load with ``net.load_weights(read_weights(path))``."""
    path = Path(path)
    tensors = {f"param/{name}": numpy.ascontiguousarray(backend.to_numpy(value))
               for name, value in net.state_dict().items()}
    data = save_safetensors(tensors, metadata={"mnn_version": __version__})
    remove_stale_temporaries(path)
    return atomic_write(path, lambda handle: handle.write(data))


def read_weights(path):
    """The arrays ``save_weights`` wrote (or a checkpoint's weights), by name, checked as a checkpoint's
    are (nothing is unpickled)."""
    data = read_regular_file(path)
    read_header(path, data)
    return {name.removeprefix("param/"): value for name, value in load_tensors(path, data).items()
            if name.startswith("param/")}


# -- reading ----------------------------------------------------------------
def read_checkpoint(path):
    """(tensors, document) from a checkpoint, every part checked (see the module docstring)."""
    data = read_regular_file(path)
    header = read_header(path, data)
    document = read_document(path, header.pop("__metadata__", None))
    document["architecture"] = models.resolve(document["architecture"])  # every setting spelled out
    check_parameter_count(path, document["architecture"], header)
    return load_tensors(path, data), document


def read_regular_file(path):
    """The bytes of ``path`` if it is a regular file, read no further than the size it had when opened.

    A FIFO would block a read, ``/dev/zero`` would never end one, and a folder or socket has
    no bytes to give. O_NONBLOCK keeps the open itself from waiting on a FIFO, and the file
    is checked again once open, in case it was swapped in between."""
    check_regular(path, os_call(path, "read", os.stat, path).st_mode)
    descriptor = os_call(path, "open", os.open, path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os_call(path, "read", os.fstat, descriptor)
        check_regular(path, info.st_mode)
    except CheckpointError:
        os.close(descriptor)
        raise
    with os.fdopen(descriptor, "rb") as handle:
        return os_call(path, "read", handle.read, info.st_size)


def check_regular(path, mode):
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: {kind_of(mode)}, not a regular file; a checkpoint is a .safetensors file")


def os_call(path, doing, function, *args):
    """``function(*args)``, with an OSError turned into a CheckpointError naming ``path``."""
    try:
        return function(*args)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot {doing} it: {error.strerror or error}") from error


def read_header(path, data):
    """The safetensors header (a u64 length, then JSON): each tensor's entry checked, ``__metadata__`` kept."""
    header_ok = len(data) >= 9 and data[8:9] == b"{"
    if not header_ok and data.startswith(PICKLE_SIGNATURES):
        raise CheckpointError(f"{path}: this is a pickle (or torch.save) file; mnn never unpickles. "
                              "Checkpoints are safetensors files written by mnn")
    length = int.from_bytes(data[:8], "little")
    if not header_ok or length > len(data) - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header of {length:,} bytes; at most {MAX_HEADER_BYTES:,} are read")
    header = parse_json(path, data[8:8 + length], "header")
    if type(header) is not dict:
        raise CheckpointError(f"{path}: header: must be a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not name.startswith(("param/", "optim/")):
            raise CheckpointError(f"{path}: tensor {json.dumps(name)}: mnn names tensors param/... or optim/...")
        checked(path, TENSOR_ENTRY, entry, f"tensor {json.dumps(name)}")
    return header


def read_document(path, metadata):
    """The JSON document under ``__metadata__["mnn"]``, checked against the schema."""
    if type(metadata) is dict and "mnn_version" in metadata and "mnn" not in metadata:
        raise CheckpointError(f"{path}: weights alone, as save_weights writes them: build the network again and "
                              "load them with net.load_weights(mnn.checkpoint.read_weights(path))")
    if type(metadata) is not dict or type(metadata.get("mnn")) is not str:
        raise CheckpointError(f'{path}: __metadata__.mnn: missing; not a checkpoint written by mnn')
    document = parse_json(path, metadata["mnn"], "__metadata__.mnn")
    return checked(path, check_document, document)


def checked(path, rule, value, *field):
    """``value`` after ``rule(value, *field)``, with a FieldError turned into a CheckpointError."""
    try:
        rule(value, *field)
    except FieldError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return value


def parse_json(path, text, what):
    try:
        return json.loads(text, object_pairs_hook=without_duplicate_keys)
    except RecursionError:
        error = "nested too deeply"
    except ValueError as problem:  # also bad UTF-8, and integers of thousands of digits
        error = f"not valid JSON ({one_line(problem)})"
    raise CheckpointError(f"{path}: {what}: {error}")


def without_duplicate_keys(pairs):
    """A JSON object as a dict; a key given twice is refused (a dict would keep the last silently)."""
    counts = Counter(key for key, _ in pairs)
    if len(counts) != len(pairs):
        raise ValueError(f"key {json.dumps(counts.most_common(1)[0][0])} appears twice")
    return dict(pairs)


def check_parameter_count(path, architecture, header):
    """The network the architecture describes holds exactly the values the ``param/`` tensors do.

    Counted from closed-form formulas, before anything is built: a document claiming a
    10-million-layer GPT fails here, without allocating it."""
    described = models.parameter_count(architecture, buffers=True)
    held = sum(math.prod(entry["shape"]) for name, entry in header.items() if name.startswith("param/"))
    if described != held:
        raise CheckpointError(f"{path}: architecture: describes {described:,} parameters and buffers, "
                              f"but the param/ tensors hold {held:,}")


def load_tensors(path, data):
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({one_line(error)})") from error
    for name, tensor in tensors.items():
        if not numpy.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {json.dumps(name)}: holds NaN or infinity")
        if name.endswith("running_var") and not (tensor >= 0).all():
            raise CheckpointError(f"{path}: tensor {json.dumps(name)}: a variance below 0")
    return tensors


# -- loading into a network -------------------------------------------------
def load_checkpoint(path, net=None, optimizer=None):
    """Load a checkpoint into ``net`` (built from its architecture when not given) and ``optimizer``.

    Names, shapes and settings are all checked before anything is copied, so a failure
    leaves ``net`` and ``optimizer`` as they were. Returns ``(net, metadata)``.
    """
    tensors, document = read_checkpoint(path)
    params = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    buffers = {k.removeprefix("optim/"): v for k, v in tensors.items() if k.startswith("optim/")}
    if optimizer is not None:
        optimizer_state = checked_optimizer_state(path, optimizer, document, buffers)
    if net is None:
        net = models.build(document["architecture"])
    try:
        net.load_weights(params)
    except ValueError as error:
        raise CheckpointError(f"{path}: does not fit the network: {error}") from error
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return net, document


def checked_optimizer_state(path, optimizer, document, buffers):
    """The optimizer's saved state, once its name, settings and every buffer are known to fit ``optimizer``."""
    if "optimizer" not in document:
        raise CheckpointError(f"{path}: optimizer: missing; the checkpoint holds no optimizer state")
    name = document["optimizer"]["name"]
    if name != type(optimizer).__name__:
        raise CheckpointError(f"{path}: optimizer.name: the state of {name} cannot load into "
                              f"{type(optimizer).__name__}")
    state = {"settings": document["optimizer"]["settings"], "buffers": buffers}
    try:
        optimizer.check_settings(state["settings"])
        optimizer.check_buffers(buffers, state["settings"])
    except ValueError as error:
        raise CheckpointError(f"{path}: optimizer: {error}") from error
    return state


# -- resuming a training run --------------------------------------------------
def read_resume_checkpoint(path):
    """The document of a training run's checkpoint, with everything ``Trainer.resume`` reads checked.

    On top of ``read_checkpoint``: config, step, metrics, running loss, RNG state and
    optimizer are present and in range, and the network ``config`` describes is the
    checkpoint's architecture (see ``checkpoint_schema.check_resume_document``)."""
    _, document = read_checkpoint(path)
    return checked(path, check_resume_document, document)


def check_resume_step(path, step, total_steps):
    """A saved step past the run's last step is an error, not a finished run."""
    if step > total_steps:
        raise CheckpointError(f"{path}: step: {step} lies beyond the end of the run it resumes "
                              f"({total_steps} steps)")
