"""Checkpoints: round trip, atomic writes, and refusal of pickles, truncated files and wrong shapes.

tests/test_checkpoint_hostile.py holds the many hostile inputs; tests/test_checkpoint_schema.py the schema.
"""
import os
import pickle
import re
import stat
import subprocess
import sys

import numpy
import pytest

from mnn import models, optim
from mnn.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    read_resume_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)

ARCHITECTURE = {"name": "mlp", "kwargs": {"in_features": 12, "hidden": [8], "classes": 3}}


def trained_net(rng):
    net = models.build(ARCHITECTURE)
    net.optimizer = optim.Adam(net, lr=0.01)
    for _ in range(3):
        net.zero_grads()
        net(rng.standard_normal((4, 12)).astype(numpy.float32), rng.integers(0, 3, 4))
        net.backward()
        net.step()
    return net


def test_round_trip_rebuilds_the_network_and_optimizer(tmp_path, rng):
    net = trained_net(rng)
    path = save_checkpoint(tmp_path / "c.safetensors", net, ARCHITECTURE, net.optimizer, step=3, note="hi")
    fresh_optimizer_target = models.build(ARCHITECTURE)
    optimizer = optim.Adam(fresh_optimizer_target, lr=0.5)
    loaded, meta = load_checkpoint(path, fresh_optimizer_target, optimizer)
    assert meta["step"] == 3 and meta["note"] == "hi" and meta["architecture"] == models.resolve(ARCHITECTURE)
    assert optimizer.steps == 3 and optimizer.lr == 0.01
    for name, value in net.params.items():
        assert numpy.array_equal(loaded.params[name], value)
    for name, value in net.optimizer.buffers.items():
        assert numpy.array_equal(optimizer.buffers[name], value)
    rebuilt, _ = load_checkpoint(path)
    x = rng.standard_normal((2, 12)).astype(numpy.float32)
    assert numpy.array_equal(rebuilt.eval()(x), net.eval()(x))


def test_pickle_is_refused_without_being_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_truncated_file_is_refused(tmp_path, rng):
    path = save_checkpoint(tmp_path / "c.safetensors", trained_net(rng), ARCHITECTURE)
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            read_checkpoint(path)


def test_shape_mismatch_is_refused_and_changes_nothing(tmp_path, rng):
    path = save_checkpoint(tmp_path / "c.safetensors", trained_net(rng), ARCHITECTURE)
    other = models.build({"name": "mlp", "kwargs": {"in_features": 12, "hidden": [9], "classes": 3}})
    before = {k: v.copy() for k, v in other.params.items()}
    with pytest.raises(CheckpointError, match=r"shape \(8, 12\); expected \(9, 12\)"):
        load_checkpoint(path, other)
    assert all(numpy.array_equal(before[k], v) for k, v in other.params.items())


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, rng, monkeypatch):
    net = trained_net(rng)
    path = save_checkpoint(tmp_path / "c.safetensors", net, ARCHITECTURE, step=1)
    import mnn.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_safetensors", lambda tensors, metadata: b"partial" + broken())
    with pytest.raises(OSError):
        save_checkpoint(path, net, ARCHITECTURE, step=2)
    assert read_checkpoint(path)[1]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path, rng):
    """safetensors begins with the header length: 0x80 there must not be mistaken for a pickle."""
    net = trained_net(rng)
    for padding in range(300):
        path = save_checkpoint(tmp_path / "c.safetensors", net, ARCHITECTURE, pad="x" * padding)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_checkpoint(path)[1]["pad"] == "x" * padding


def test_checkpoints_record_every_model_setting(tmp_path):
    from mnn.train import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(limit=200, batch_size=50, steps=1, model_kwargs={"hidden": [8]}), tmp_path,
                      quiet=True)
    trainer.run()
    architecture = read_checkpoint(tmp_path / "checkpoint.safetensors")[1]["architecture"]
    assert architecture == {"name": "mlp", "kwargs": {"in_features": 784, "hidden": [8], "classes": 10,
                                                      "dropout": 0.2}}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_checkpoint_gets_the_mode_the_umask_gives_any_new_file(tmp_path, rng, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.safetensors", trained_net(rng), ARCHITECTURE)
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


def test_the_folder_is_synced_after_the_file(tmp_path, rng, monkeypatch):
    """The rename is durable only once the folder holding it is synced."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(descriptor):
        synced.append("folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "file")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint(tmp_path / "c.safetensors", trained_net(rng), ARCHITECTURE)
    assert synced[0] == "file" and synced[-1] == "folder"


KILLED_SAVE = """
import os, signal, sys
from mnn import checkpoint, models

real_atomic_write = checkpoint.atomic_write

def killed_midway(path, write):
    def write_part_then_die(handle):
        handle.write(b"x" * 100)
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_atomic_write(path, write_part_then_die)

checkpoint.atomic_write = killed_midway
architecture = {"name": "mlp", "kwargs": {"in_features": 12, "hidden": [8], "classes": 3}}
checkpoint.save_checkpoint(sys.argv[1], models.build(architecture), architecture)
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_the_next_save_removes_what_a_killed_save_left(tmp_path, rng):
    path = tmp_path / "c.safetensors"
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], capture_output=True)
    assert killed.returncode == -9
    left = list(tmp_path.glob(".c.safetensors.*.tmp"))
    assert len(left) == 1 and not path.exists()
    other = tmp_path / ".other.safetensors.abcd1234.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    folder = tmp_path / ".c.safetensors.folder.tmp"  # not a file
    folder.mkdir()
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep")
    (tmp_path / ".c.safetensors.link.tmp").symlink_to(precious)  # a link: neither followed nor removed
    save_checkpoint(path, trained_net(rng), ARCHITECTURE)
    assert not left[0].exists() and other.exists() and folder.exists() and precious.read_bytes() == b"keep"
    assert (tmp_path / ".c.safetensors.link.tmp").is_symlink()
    assert remove_stale_temporaries(path) == []
    assert read_checkpoint(path)[1]["architecture"] == models.resolve(ARCHITECTURE)


def test_a_training_runs_checkpoint_passes_the_resume_checks(tmp_path):
    from mnn.train import TrainConfig, Trainer
    trainer = Trainer(TrainConfig(limit=200, batch_size=50, steps=2, model_kwargs={"hidden": [8]}), tmp_path,
                      quiet=True)
    trainer.run()
    document = read_resume_checkpoint(tmp_path / "checkpoint.safetensors")
    assert document["step"] == 2 and document["optimizer"]["name"] == "AdamW"


def test_a_negative_running_variance_is_refused(tmp_path):
    import json as json_module

    from safetensors.numpy import load_file, save_file

    from mnn import models
    from mnn.checkpoint import CheckpointError
    architecture = {"name": "cnn", "kwargs": {"channels": [2], "hidden": [4]}}
    path = save_checkpoint(tmp_path / "c.safetensors", models.build(architecture), architecture)
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("running_var"))
    tensors[name][0] = -1e-5
    metadata = {"mnn": json_module.dumps(read_checkpoint(path)[1])}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=f'tensor "{name}": a variance below 0'):
        read_checkpoint(path)


@pytest.mark.parametrize("architecture, message", [
    (None, "save a network of your own with mnn.checkpoint.save_weights"),
    ({"name": "custom"}, "unknown model 'custom'"),
    ({"name": "mlp", "kwargs": {"depth": 3}}, "no setting depth"),
    ({"name": "mlp", "kwargs": {"hidden": [4]}, "extra": 1}, "a dict of a model's name and kwargs"),
    ({"name": "mlp", "kwargs": {"hidden": [5]}}, "describes 3,985 parameters and buffers, but the network holds 3,190"),
])
def test_an_architecture_no_checkpoint_could_rebuild_is_refused_at_saving(tmp_path, architecture, message):
    net = models.build({"name": "mlp", "kwargs": {"hidden": [4]}})
    with pytest.raises(ValueError, match=f"architecture: .*{re.escape(message)}"):
        save_checkpoint(tmp_path / "c.safetensors", net, architecture)
    assert not list(tmp_path.iterdir())


def test_a_network_of_your_own_saves_and_reads_its_weights(tmp_path):
    import mnn
    from mnn.checkpoint import read_weights, save_weights

    def build():
        return mnn.SequentialLayers([mnn.LinearLayer(3, 4), mnn.BatchNormLayer(4), mnn.TanhLayer(),
                                     mnn.LinearLayer(4, 2), mnn.MSELossLayer()])
    net, x = build(), numpy.random.default_rng(0).standard_normal((6, 3)).astype(numpy.float32)
    net(x, numpy.zeros((6, 2), numpy.float32))  # batch norm's running statistics move off their start
    net.eval()
    save_weights(tmp_path / "w.safetensors", net)
    again = build()
    again.load_weights(read_weights(tmp_path / "w.safetensors"))
    again.eval()
    numpy.testing.assert_array_equal(again(x), net(x))
    with pytest.raises(ValueError, match="missing"):
        mnn.SequentialLayers([mnn.LinearLayer(3, 4), mnn.MSELossLayer()]).load_weights(
            read_weights(tmp_path / "w.safetensors"))
    (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="mnn never unpickles"):
        read_weights(tmp_path / "p.safetensors")


def test_read_weights_takes_a_checkpoints_weights_too(tmp_path):
    from mnn.checkpoint import read_weights
    net = models.build({"name": "mlp", "kwargs": {"hidden": [4]}})
    net.optimizer = optim.AdamW(net, lr=1e-3)
    save_checkpoint(tmp_path / "c.safetensors", net, {"name": "mlp", "kwargs": {"hidden": [4]}}, net.optimizer)
    again = models.build({"name": "mlp", "kwargs": {"hidden": [4]}})
    again.load_weights(read_weights(tmp_path / "c.safetensors"))  # the optimizer's buffers left out
    for name, value in net.state_dict().items():
        numpy.testing.assert_array_equal(again.state_dict()[name], value)


def test_a_failed_save_names_the_file_asked_for_not_the_temporary_one(tmp_path, rng):
    from mnn.checkpoint import save_weights
    net = trained_net(rng)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a file").write_text("x")
    cases = {tmp_path / "folder": "Is a directory",
             tmp_path / "a file" / "w.safetensors": "a file stands where a folder of its path should be"}
    for path, why in cases.items():
        with pytest.raises(OSError, match=rf"^\[Errno \d+\] cannot write {re.escape(str(path))} \({why}\)$"):
            save_weights(path, net)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "folder"]
    assert not any((tmp_path / "folder").iterdir())  # no temporary file left behind


def test_loading_weights_alone_as_a_checkpoint_says_how_to_load_them(tmp_path, rng):
    import mnn
    from mnn.checkpoint import save_weights
    save_weights(tmp_path / "w.safetensors", trained_net(rng))
    with pytest.raises(CheckpointError, match=r"weights alone, as save_weights writes them: .*read_weights"):
        mnn.load(tmp_path / "w.safetensors")


def test_what_the_writer_raises_passes_unchanged(tmp_path):
    """A download writes from inside atomic_write: its network error is not the disk's."""
    from mnn.files import atomic_write

    def fetch(handle):
        raise ConnectionResetError(104, "Connection reset by peer")
    with pytest.raises(ConnectionResetError, match=r"^\[Errno 104\] Connection reset by peer$"):
        atomic_write(tmp_path / "train.gz", fetch)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_writing_names_the_file(tmp_path):
    """ENOSPC comes from inside the writer (the bytes going out), yet it is the disk's: it names the target."""
    import errno

    from mnn.files import atomic_write

    def fill(handle):
        handle.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    target = tmp_path / "checkpoint.safetensors"
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(target))} \(No space left on device\)$"):
        atomic_write(target, fill)
    assert not list(tmp_path.iterdir())
