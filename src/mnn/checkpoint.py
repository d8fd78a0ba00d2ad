"""Checkpoints: tensors in safetensors format, everything else as JSON. No pickle, ever.

One file holds the parameters (``param/<name>``), the optimizer's buffers
(``optim/<name>``) and a JSON document in the safetensors header: the architecture
(so the checkpoint rebuilds its own network), the mnn version, and whatever the
trainer adds (normalisation, optimizer settings, step, RNG state, metrics).
Writes are atomic: a temporary file, fsync, rename.
"""
import json
from pathlib import Path

import numpy
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from . import __version__, backend
from .data.download import atomic_write

PICKLE_SIGNATURES = (b"\x80", b"PK\x03\x04")  # a pickle protocol header, or torch.save's zip


class CheckpointError(ValueError):
    """A file that is not a valid mnn checkpoint, or does not fit the network."""


def save_checkpoint(path, net, architecture, optimizer=None, **metadata):
    """Write ``net``'s parameters, the optimizer state and JSON metadata to ``path`` atomically."""
    tensors = {f"param/{name}": backend.to_numpy(p) for name, p in net.state_dict().items()}
    document = {"mnn_version": __version__, "architecture": architecture, **metadata}
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors.update({f"optim/{k}": backend.to_numpy(v) for k, v in state["buffers"].items()})
        document["optimizer"] = {"name": type(optimizer).__name__, "settings": state["settings"]}
    data = save_safetensors({k: numpy.ascontiguousarray(v) for k, v in tensors.items()},
                            metadata={"mnn": json.dumps(document)})
    atomic_write(path, lambda handle: handle.write(data))
    return Path(path)


def read_checkpoint(path):
    """(tensors, metadata) from a checkpoint, refusing pickles and truncated files without running anything."""
    data = Path(path).read_bytes()
    header_ok = len(data) >= 9 and data[8:9] == b"{"  # safetensors: u64 header length, then JSON
    if not header_ok and data.startswith(PICKLE_SIGNATURES):
        raise CheckpointError(f"{path}: this is a pickle (or torch.save) file; mnn never unpickles. "
                              "Checkpoints are safetensors files written by mnn")
    if not header_ok or int.from_bytes(data[:8], "little") > len(data) - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    try:
        tensors = load_safetensors(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        document = json.loads(header["__metadata__"]["mnn"])
    except (SafetensorError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error})") from error
    return tensors, document


def load_checkpoint(path, net=None, optimizer=None):
    """Load a checkpoint into ``net`` (built from its architecture when not given) and ``optimizer``.

    Names and shapes are checked before anything is copied. Returns ``(net, metadata)``.
    """
    from .models import build

    tensors, document = read_checkpoint(path)
    net = net or build(document["architecture"])
    params = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
    try:
        net.load_weights(params)
    except ValueError as error:
        raise CheckpointError(f"{path}: does not fit the network: {error}") from error
    if optimizer is not None and "optimizer" in document:
        buffers = {k.removeprefix("optim/"): v for k, v in tensors.items() if k.startswith("optim/")}
        optimizer.load_state_dict({"settings": document["optimizer"]["settings"], "buffers": buffers})
    return net, document
