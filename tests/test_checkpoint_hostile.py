"""Hostile checkpoints: each is refused with a one-line CheckpointError naming the file and the field,
before anything is built. No traceback of another kind, no silent acceptance, no unpickling."""
import copy
import dataclasses
import json
import os
import pickle
import socket
import zipfile

import numpy
import pytest
from safetensors.numpy import save as save_safetensors

from mnn import backend, checkpoint, models, optim
from mnn.checkpoint import (
    CheckpointError,
    check_resume_step,
    load_checkpoint,
    read_checkpoint,
    read_resume_checkpoint,
    save_checkpoint,
)
from mnn.train import TrainConfig

ARCHITECTURE = models.resolve({"name": "mlp", "kwargs": {"in_features": 12, "hidden": [8], "classes": 3}})
NAN, INF = float("nan"), float("inf")
DELETE = object()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A training run's checkpoint as Trainer.save writes it: an MLP and AdamW after two steps."""
    backend.seed(0)
    net = models.build(ARCHITECTURE)
    optimizer = optim.AdamW(net, lr=0.01)
    rng = numpy.random.default_rng(0)
    for _ in range(2):
        net.zero_grads()
        net(rng.standard_normal((4, 12)).astype(numpy.float32), rng.integers(0, 3, 4))
        net.backward()
        optimizer.step()
    config = dataclasses.asdict(TrainConfig(model_kwargs={"in_features": 12, "hidden": [8]}, limit=200))
    path = tmp_path_factory.mktemp("valid") / "checkpoint.safetensors"
    return save_checkpoint(path, net, ARCHITECTURE, optimizer, config=config, step=2,
                           metrics=[{"step": 1, "epoch": 0.5, "train_loss": 1.1, "lr": 0.01, "val_loss": 1.0,
                                     "val_accuracy": 0.5}],
                           running_loss=[1.5, 2], rng_state=backend.get_rng_state(),
                           normalizer={"mean": 0.2, "std": 0.3}, classes=["a", "b", "c"])


def parts(path):
    """(tensors, document) read without any check, to be tampered with."""
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    from safetensors.numpy import load
    return load(data), json.loads(header["__metadata__"]["mnn"])


def written(path, tensors, document):
    """A checkpoint file with these tensors and this document (a JSON value, or raw JSON text)."""
    text = document if isinstance(document, str) else json.dumps(document)
    path.write_bytes(save_safetensors(tensors, metadata={"mnn": text}))
    return path


def header_file(path, header, payload=b""):
    """A safetensors file from a raw header (a JSON value or bytes) and payload."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    return path


def assert_refused(path, field, read):
    """``read(path)`` raises a one-line CheckpointError naming ``path`` and ``field``, and nothing else."""
    with pytest.raises(CheckpointError) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message
    assert "\n" not in message, message


# -- the document -------------------------------------------------------------
def evaluation(**changes):
    """One evaluation's record in ``metrics``, as a run writes it, with ``changes`` (DELETE: a field left out)."""
    record = {"step": 1, "epoch": 0.1, "train_loss": 1.0, "lr": 1e-3, "val_loss": 1.0, **changes}
    return {key: value for key, value in record.items() if value is not DELETE}


def changed(where, value):
    """A change setting the field at dotted path ``where`` to ``value`` (DELETE: removing it)."""
    def change(document):
        *parents, last = where.split(".")
        target = document
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
        return document
    return change


def as_gpt(**kwargs):
    """A change to a GPT architecture (and no image-classifier metadata), with ``kwargs`` as its settings."""
    def change(document):
        for key in ("normalizer", "classes", "config"):
            document.pop(key)
        document["architecture"] = {"name": "gpt", "kwargs": {"vocab_size": 5, "context": 4, "layers": 1,
                                                               "heads": 1, "width": 4, **kwargs}}
        return document
    return change


def nested(depth):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


DOCUMENT_ATTACKS = {  # name: (change to a valid document, the field the error must name)
    # the document itself
    "document-null": (lambda d: None, "document: must be a JSON object, got null"),
    "document-list": (lambda d: [d], "document: must be a JSON object"),
    "document-string": (lambda d: json.dumps("mnn"), "document: must be a JSON object, got \"mnn\""),
    "document-number": (lambda d: 5, "document: must be a JSON object"),
    "not-json": (lambda d: "{", "__metadata__.mnn: not valid JSON"),
    "duplicate-key": (lambda d: json.dumps(d)[:-1] + ', "step": 9999}', 'key "step" appears twice'),
    "integer-of-5000-digits": (lambda d: json.dumps(d)[:-1] + ', "big": ' + "7" * 5000 + "}", "not valid JSON"),
    "nested-20-deep": (changed("note", nested(20)), "document: objects and lists nested deeper than 16"),
    "nested-100000-deep": (lambda d: json.dumps(d)[:-1] + ', "note": ' + "[" * 100000 + "]" * 100000 + "}",
                           "nested"),
    "version-missing": (changed("mnn_version", DELETE), "mnn_version: missing"),
    "version-number": (changed("mnn_version", 1), "mnn_version: must be a string"),
    "version-null": (changed("mnn_version", None), "mnn_version: must be a string, got null"),
    # the architecture
    "architecture-missing": (changed("architecture", DELETE), "architecture: missing"),
    "architecture-null": (changed("architecture", None), "architecture: must be an object, got null"),
    "architecture-list": (changed("architecture", ["mlp"]), "architecture: must be an object"),
    "model-unknown": (changed("architecture.name", "rnn"), "architecture: unknown model 'rnn'"),
    "model-name-missing": (changed("architecture.name", DELETE), "architecture.name: missing"),
    "model-name-number": (changed("architecture.name", 3), "architecture.name: must be a string"),
    "kwargs-list": (changed("architecture.kwargs", [12, 8]), "architecture.kwargs: must be an object"),
    "setting-unknown": (changed("architecture.kwargs.evil", 1), "architecture: model 'mlp' has no setting evil"),
    "hidden-text": (changed("architecture.kwargs.hidden", "abc"), 'hidden: must be a list, got "abc"'),
    "hidden-negative": (changed("architecture.kwargs.hidden", [-8]), "hidden[0]: must be an integer in [1,"),
    "hidden-zero": (changed("architecture.kwargs.hidden", [0]), "hidden[0]: must be an integer"),
    "hidden-bool": (changed("architecture.kwargs.hidden", [True]), "hidden[0]: must be an integer"),
    "hidden-fraction": (changed("architecture.kwargs.hidden", [8.5]), "hidden[0]: must be an integer"),
    "hidden-nan": (changed("architecture.kwargs.hidden", [NAN]), "hidden[0]: must be an integer"),
    "hidden-5000-layers": (changed("architecture.kwargs.hidden", [8] * 5000), "hidden: must hold 0 to 1000 items"),
    "in-features-zero": (changed("architecture.kwargs.in_features", 0), "in_features: must be an integer"),
    "in-features-10-to-the-30": (changed("architecture.kwargs.in_features", 10 ** 30), "in_features: must be"),
    "in-features-null": (changed("architecture.kwargs.in_features", None), "in_features: must be an integer"),
    "classes-bool": (changed("architecture.kwargs.classes", True), "classes: must be an integer"),
    "dropout-nan": (changed("architecture.kwargs.dropout", NAN), "dropout: must be a finite number >= 0 and < 1"),
    "dropout-one": (changed("architecture.kwargs.dropout", 1.0), "dropout: must be"),
    "dropout-negative": (changed("architecture.kwargs.dropout", -0.1), "dropout: must be"),
    "dropout-text": (changed("architecture.kwargs.dropout", "0.1"), "dropout: must be"),
    "dropout-infinity": (changed("architecture.kwargs.dropout", INF), "dropout: must be"),
    "wider-than-the-tensors": (changed("architecture.kwargs.hidden", [9]), "but the param/ tensors hold"),
    "deeper-than-the-tensors": (changed("architecture.kwargs.hidden", [8, 8]), "but the param/ tensors hold"),
    "gpt-heads-zero": (as_gpt(heads=0), "heads: must be an integer"),
    "gpt-layers-ten-million": (as_gpt(layers=10 ** 7), "layers: must be an integer in [1, 1000]"),
    "gpt-layers-negative": (as_gpt(layers=-1), "layers: must be"),
    "gpt-width-not-divisible": (as_gpt(width=10, heads=3), "width: 10 is not divisible by heads = 3"),
    "gpt-width-text": (as_gpt(width="abc"), "width: must be an integer"),
    "gpt-vocab-bool": (as_gpt(vocab_size=True), "vocab_size: must be"),
    "gpt-context-fraction": (as_gpt(context=4.5), "context: must be"),
    "gpt-tie-weights-number": (as_gpt(tie_weights=1), "tie_weights: must be true or false"),
    "gpt-bias-text": (as_gpt(bias="no"), "bias: must be true or false"),
    "gpt-huge-within-ranges": (as_gpt(layers=1000, width=2 ** 20, heads=1), "but the param/ tensors hold"),
    "gpt-vocab-of-the-wrong-size": (lambda d: {**as_gpt()(d), "vocab": "abc"},
                                    "vocab: 3 characters do not fit vocab_size = 5"),
    "gpt-vocab-duplicates": (lambda d: {**as_gpt()(d), "vocab": "aabcd"}, "vocab: must be a non-empty string"),
    "cnn-too-deep-for-its-image": (changed("architecture", {"name": "cnn", "kwargs": {"channels": [4] * 6}}),
                                   "image_size: 28 is too small for 6 convolution stages"),
    "cnn-batch-norm-text": (changed("architecture", {"name": "cnn", "kwargs": {"batch_norm": "yes"}}),
                            "batch_norm: must be true or false"),
    "cnn-channels-zero": (changed("architecture", {"name": "cnn", "kwargs": {"channels": [0]}}), "channels[0]"),
    "cnn-image-size-zero": (changed("architecture", {"name": "cnn", "kwargs": {"image_size": 0}}), "image_size: must"),
    "gpt-dropout-one": (as_gpt(dropout=1.0), "dropout: must be"),
    # the optimizer
    "optimizer-null": (changed("optimizer", None), "optimizer: must be an object"),
    "optimizer-name-unknown": (changed("optimizer.name", "Evil"), "optimizer.name: must be one of"),
    "optimizer-name-missing": (changed("optimizer.name", DELETE), "optimizer.name: missing"),
    "optimizer-settings-missing": (changed("optimizer.settings", DELETE), "optimizer.settings: missing"),
    "optimizer-settings-list": (changed("optimizer.settings", []), "optimizer.settings: must be an object"),
    "optimizer-field-unknown": (changed("optimizer.evil", 1), "optimizer.evil: unknown field"),
    "optimizer-lr-nan": (changed("optimizer.settings.lr", NAN), "AdamW: lr must be a finite number >= 0, got nan"),
    "optimizer-lr-negative": (changed("optimizer.settings.lr", -1e-3), "AdamW: lr must be"),
    "optimizer-lr-text": (changed("optimizer.settings.lr", "abc"), "AdamW: lr must be"),
    "optimizer-lr-infinity": (changed("optimizer.settings.lr", INF), "AdamW: lr must be"),
    "optimizer-beta1-one": (changed("optimizer.settings.beta1", 1.0), "AdamW: beta1 must be a number in [0, 1)"),
    "optimizer-beta2-negative": (changed("optimizer.settings.beta2", -0.5), "AdamW: beta2 must be"),
    "optimizer-eps-zero": (changed("optimizer.settings.eps", 0.0), "AdamW: eps must be"),
    "optimizer-decay-negative": (changed("optimizer.settings.weight_decay", -1.0), "AdamW: weight_decay must be"),
    "optimizer-steps-negative": (changed("optimizer.settings.steps", -1), "AdamW: steps must be an integer >= 0"),
    "optimizer-steps-fraction": (changed("optimizer.settings.steps", 2.5), "AdamW: steps must be"),
    "optimizer-steps-bool": (changed("optimizer.settings.steps", True), "AdamW: steps must be"),
    "optimizer-decay-vectors-number": (changed("optimizer.settings.decay_vectors", 1), "decay_vectors must be"),
    "optimizer-setting-injected": (changed("optimizer.settings.parameters", []), "AdamW: unknown setting parameters"),
    "optimizer-method-injected": (changed("optimizer.settings.step", 0), "AdamW: unknown setting step"),
    "optimizer-dunder-injected": (changed("optimizer.settings.__class__", "x"), "unknown setting __class__"),
    "optimizer-setting-missing": (changed("optimizer.settings.lr", DELETE), "AdamW: setting lr missing"),
    "optimizer-setting-of-another-optimizer": (changed("optimizer.settings.momentum", 0.9),
                                               "AdamW: unknown setting momentum"),
    "optimizer-not-the-runs": (changed("optimizer.name", "Adam"), "optimizer.name: Adam is not the run's adamw"),
    "optimizer-missing": (changed("optimizer", DELETE), "optimizer: missing"),
    # the run's configuration
    "config-missing": (lambda d: {k: v for k, v in d.items() if k not in ("config", "normalizer")},
                       "config: missing"),
    "config-null": (changed("config", None), "config: must be an object"),
    "config-list": (changed("config", [1]), "config: must be an object"),
    "config-field-missing": (changed("config.lr", DELETE), "config.lr: missing"),
    "config-field-unknown": (changed("config.evil", 1), "config.evil: unknown field"),
    "config-lr-text": (changed("config.lr", "abc"), "config.lr: must be a finite number > 0"),
    "config-lr-zero": (changed("config.lr", 0), "config.lr: must be"),
    "config-lr-nan": (changed("config.lr", NAN), "config.lr: must be"),
    "config-batch-size-zero": (changed("config.batch_size", 0), "config.batch_size: must be an integer >= 1"),
    "config-batch-size-bool": (changed("config.batch_size", True), "config.batch_size: must be"),
    "config-batch-size-fraction": (changed("config.batch_size", 64.5), "config.batch_size: must be"),
    "config-epochs-nan": (changed("config.epochs", NAN), "config.epochs: must be"),
    "config-epochs-negative": (changed("config.epochs", -2), "config.epochs: must be"),
    "config-steps-negative": (changed("config.steps", -1), "config.steps: must be"),
    "config-warmup-negative": (changed("config.warmup_steps", -5), "config.warmup_steps: must be"),
    "config-momentum-one": (changed("config.momentum", 1.0), "config.momentum: must be"),
    "config-beta2-one": (changed("config.beta2", 1.0), "config.beta2: must be"),
    "config-clip-negative": (changed("config.clip", -1.0), "config.clip: must be"),
    "config-seed-negative": (changed("config.seed", -1), "config.seed: must be"),
    "config-limit-text": (changed("config.limit", "all"), "config.limit: must be"),
    "config-data-dir-number": (changed("config.data_dir", 5), "config.data_dir: must be a string"),
    "config-decay-vectors-number": (changed("config.decay_vectors", 0), "config.decay_vectors: must be true or false"),
    "config-model-unknown": (changed("config.model", "rnn"), "config.model: must be one of"),
    "config-optimizer-unknown": (changed("config.optimizer", "lbfgs"), "config.optimizer: must be one of"),
    "config-dataset-unknown": (changed("config.dataset", "imagenet"), "config.dataset: must be one of"),
    "config-dataset-not-for-the-model": (changed("config.dataset", "tinyshakespeare"),
                                         "config.dataset: model mlp does not train on tinyshakespeare"),
    "config-min-lr-above-lr": (changed("config.min_lr", 1.0), "config.min_lr: 1.0 exceeds lr"),
    "config-model-not-the-architecture": (lambda d: {**d, "config": {**d["config"], "model": "cnn", "model_kwargs": {}}},
                                          "config.model: cnn differs from the architecture's mlp"),
    "config-model-kwargs-list": (changed("config.model_kwargs", [8]), "config.model_kwargs: must be an object"),
    "config-model-kwargs-differ": (changed("config.model_kwargs.hidden", [4096] * 64),
                                   "config.model_kwargs.hidden: a list of 64 items differs"),
    "config-model-kwargs-unknown": (changed("config.model_kwargs.layers", 10 ** 7),
                                    "config.model_kwargs.layers: not a setting of model mlp"),
    "config-model-kwargs-out-of-range": (changed("config.model_kwargs.dropout", 2.0),
                                         "config.model_kwargs.dropout: must be a finite number >= 0 and < 1"),
    "config-model-kwargs-text": (changed("config.model_kwargs.hidden", "abc"), "config.model_kwargs.hidden: must be"),
    "config-eval-every-negative": (changed("config.eval_every", -1), "config.eval_every: must be"),
    # the step, the random generator, the metrics, the running loss
    "step-missing": (changed("step", DELETE), "step: missing"),
    "step-negative": (changed("step", -1), "step: must be an integer >= 0"),
    "step-fraction": (changed("step", 1.5), "step: must be"),
    "step-text": (changed("step", "2"), "step: must be"),
    "step-bool": (changed("step", True), "step: must be"),
    "step-nan": (changed("step", NAN), "step: must be"),
    "rng-missing": (changed("rng_state", DELETE), "rng_state: missing"),
    "rng-null": (changed("rng_state", None), "rng_state: must be an object"),
    "rng-other-generator": (changed("rng_state.bit_generator", "MT19937"), "rng_state.bit_generator: must be"),
    "rng-state-missing": (changed("rng_state.state", DELETE), "rng_state.state: missing"),
    "rng-state-negative": (changed("rng_state.state.state", -1),
                           "rng_state.state.state: must be an integer in [0, 2**128 - 1], got -1"),
    "rng-state-too-big": (changed("rng_state.state.state", 2 ** 128), "rng_state.state.state: must be"),
    "rng-state-text": (changed("rng_state.state.state", "0"), "rng_state.state.state: must be"),
    "rng-inc-even": (changed("rng_state.state.inc", 2), "rng_state.state.inc: must be odd"),
    "rng-inc-zero": (changed("rng_state.state.inc", 0), "rng_state.state.inc: must be"),
    "rng-has-uint32-two": (changed("rng_state.has_uint32", 2), "rng_state.has_uint32: must be"),
    "rng-uinteger-negative": (changed("rng_state.uinteger", -1), "rng_state.uinteger: must be"),
    "rng-uinteger-too-big": (changed("rng_state.uinteger", 2 ** 32), "rng_state.uinteger: must be"),
    "rng-field-unknown": (changed("rng_state.evil", 1), "rng_state.evil: unknown field"),
    "rng-has-uint32-bool": (changed("rng_state.has_uint32", True), "rng_state.has_uint32: must be"),
    "metrics-missing": (changed("metrics", DELETE), "metrics: missing"),
    "metrics-object": (changed("metrics", {"step": 1}), "metrics: must be a list"),
    "metrics-of-numbers": (changed("metrics", [1, 2]), "metrics[0]: must be an object"),
    "metrics-nan": (changed("metrics", [evaluation(val_loss=NAN)]), "metrics[0].val_loss: must be a finite number"),
    "metrics-infinity": (changed("metrics", [evaluation(val_loss=-INF)]), "metrics[0].val_loss: must be"),
    "metrics-text": (changed("metrics", [evaluation(), evaluation(val_loss="low")]), "metrics[1].val_loss: must be"),
    "metrics-bool": (changed("metrics", [evaluation(val_accuracy=True)]), "metrics[0].val_accuracy: must be"),
    "metrics-accuracy-above-1": (changed("metrics", [evaluation(val_accuracy=1.5)]),
                                 "metrics[0].val_accuracy: must be"),
    "metrics-nested": (changed("metrics", [evaluation(val_loss=[1.0])]), "metrics[0].val_loss: must be"),
    "metrics-without-step": (changed("metrics", [evaluation(step=DELETE)]), "metrics[0].step: missing"),
    "metrics-without-val-loss": (changed("metrics", [evaluation(val_loss=DELETE)]), "metrics[0].val_loss: missing"),
    "metrics-fractional-step": (changed("metrics", [evaluation(step=1.5)]), "metrics[0].step: must be an integer"),
    "metrics-extra-nan": (changed("metrics", [evaluation(val_bleu=NAN)]), "metrics[0].val_bleu: must be a finite"),
    "metrics-list-of-lists": (changed("metrics", [[1.0]]), "metrics[0]: must be an object"),
    "running-loss-missing": (changed("running_loss", DELETE), "running_loss: missing"),
    "running-loss-nan": (changed("running_loss", [NAN, 2]), "running_loss[0]: must be a finite number"),
    "running-loss-short": (changed("running_loss", [1.5]), "running_loss: must hold exactly 2 items, got 1"),
    "running-loss-count-negative": (changed("running_loss", [1.5, -2]), "running_loss[1]: must be an integer"),
    "running-loss-count-fraction": (changed("running_loss", [1.5, 2.5]), "running_loss[1]: must be an integer"),
    "running-loss-text": (changed("running_loss", "1.5"), "running_loss: must be a list"),
    # what the task stored
    "normalizer-std-zero": (changed("normalizer.std", 0.0), "normalizer.std: must be a finite number >= 1e-06"),
    "normalizer-mean-nan": (changed("normalizer.mean", NAN), "normalizer.mean: must be a finite number"),
    "normalizer-mean-huge": (changed("normalizer.mean", 1e300), "normalizer.mean: must be a finite number >= 0"),
    "normalizer-std-above-half": (changed("normalizer.std", 0.75), "normalizer.std: must be a finite number >= 1e-06"),
    "normalizer-std-missing": (changed("normalizer.std", DELETE), "normalizer.std: missing"),
    "normalizer-field-unknown": (changed("normalizer.scale", 2.0), "normalizer.scale: unknown field"),
    "normalizer-without-config": (lambda d: {k: v for k, v in d.items() if k != "config"},
                                  "normalizer: only an image classifier's checkpoint with its config"),
    "classes-too-few": (changed("classes", ["a", "b"]), "classes: 2 class names do not fit classes = 3"),
    "classes-empty": (changed("classes", []), "classes: must hold at least 1 item, got 0"),
    "classes-numbers": (changed("classes", [1, 2, 3]), "classes[0]: must be a string"),
    "classes-a-string": (changed("classes", "abc"), "classes: must be a list"),
    "normalizer-null": (changed("normalizer", None), "normalizer: must be an object"),
    "vocab-in-an-image-classifier": (changed("vocab", "abc"), "vocab: 3 characters do not fit a mlp"),
    "data-sha256-a-number": (changed("data_sha256", 5), "data_sha256: must be a string"),
    "data-sha256-short": (changed("data_sha256", "ab12"), "data_sha256: must be 64 lowercase hexadecimal digits"),
    "data-sha256-upper": (changed("data_sha256", "A" * 64), "data_sha256: must be 64 lowercase hexadecimal"),
}
RESUME_ONLY = {  # attacks on what only resuming reads: a plain load may ignore them
    "optimizer-not-the-runs", "optimizer-missing", "config-missing", "config-model-not-the-architecture",
    "config-model-kwargs-differ", "step-missing", "rng-missing", "metrics-missing", "running-loss-missing",
}


@pytest.mark.parametrize("name", DOCUMENT_ATTACKS)
def test_a_hostile_document_is_refused_naming_the_field(name, valid, tmp_path):
    change, field = DOCUMENT_ATTACKS[name]
    tensors, document = parts(valid)
    path = written(tmp_path / "c.safetensors", tensors, change(copy.deepcopy(document)))
    assert_refused(path, field, read_resume_checkpoint)
    if name not in RESUME_ONLY:
        assert_refused(path, field, load_checkpoint)


def test_resume_only_attacks_still_fail_a_plain_load_or_are_harmless(valid, tmp_path):
    """What only ``Trainer.resume`` reads may be absent from a checkpoint that is just loaded."""
    tensors, document = parts(valid)
    for key in ("config", "step", "metrics", "running_loss", "rng_state", "optimizer", "normalizer"):
        document.pop(key)
    net, _ = load_checkpoint(written(tmp_path / "c.safetensors", tensors, document))
    assert set(net.state_dict()) == {k.removeprefix("param/") for k in tensors if k.startswith("param/")}


def test_the_valid_checkpoint_passes_every_check(valid):
    document = read_resume_checkpoint(valid)
    net = models.build(ARCHITECTURE)
    optimizer = optim.AdamW(net, lr=0.5)
    load_checkpoint(valid, net, optimizer)
    assert document["step"] == 2 and optimizer.steps == 2 and optimizer.lr == 0.01
    backend.set_rng_state(document["rng_state"])
    check_resume_step(valid, 2, 2)


def test_a_step_beyond_the_end_of_the_run_is_reported(valid):
    check_resume_step(valid, 0, 10)
    assert_refused(valid, "step: 11 lies beyond the end of the run it resumes (10 steps)",
                   lambda path: check_resume_step(path, 11, 10))


def test_a_huge_architecture_fails_fast_without_allocating(valid, tmp_path):
    """A GPT of 1000 blocks of width 2^20 would need ~10^16 numbers: refused from the counts alone."""
    import time
    tensors, document = parts(valid)
    path = written(tmp_path / "c.safetensors", tensors, as_gpt(layers=1000, width=2 ** 20)(document))
    started = time.perf_counter()
    assert_refused(path, "describes 13,194,", load_checkpoint)
    assert time.perf_counter() - started < 5


# -- tensors and the header ---------------------------------------------------
def retyped(name, dtype):
    return lambda tensors: {**tensors, name: tensors[name].astype(dtype)}


def without(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def with_value(name, value):
    def change(tensors):
        tensors = dict(tensors)
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = value
        return tensors
    return change


W, M, V = "param/1.w", "optim/1.w.m", "optim/1.w.v"
TENSOR_ATTACKS = {  # name: (change to the tensors, the words the error must hold)
    "int32-weights": (retyped(W, numpy.int32), 'tensor "param/1.w".dtype: must be one of F16, F32, F64, got "I32"'),
    "int64-weights": (retyped(W, numpy.int64), '"param/1.w".dtype: must be one of'),
    "uint8-weights": (retyped(W, numpy.uint8), '"param/1.w".dtype: must be one of'),
    "bool-weights": (retyped(W, bool), '"param/1.w".dtype: must be one of F16, F32, F64, got "BOOL"'),
    "complex-weights": (retyped(W, numpy.complex64), '"param/1.w".dtype: must be one of'),
    "int32-optimizer-state": (retyped(M, numpy.int32), '"optim/1.w.m".dtype: must be one of'),
    "nan-weight": (with_value(W, numpy.nan), 'tensor "param/1.w": holds NaN or infinity'),
    "infinite-weight": (with_value(W, numpy.inf), 'tensor "param/1.w": holds NaN or infinity'),
    "nan-in-the-moments": (with_value(M, numpy.nan), 'tensor "optim/1.w.m": holds NaN or infinity'),
    "negative-second-moment": (with_value(V, -1.0), "optimizer: AdamW: buffer 1.w.v, a mean of squares"),
    "name-without-prefix": (lambda t: {**t, "evil": t[W]}, 'tensor "evil": mnn names tensors param/'),
    "weight-missing": (without(W), "but the param/ tensors hold"),
    "weight-extra": (lambda t: {**t, "param/9.w": t[W]}, "but the param/ tensors hold"),
    "weight-renamed": (lambda t: {**without(W)(t), "param/9.w": t[W]}, "does not fit the network"),
    "weight-transposed": (lambda t: {**t, W: numpy.ascontiguousarray(t[W].T)}, "has shape (12, 8); expected"),
    "moments-all-missing": (lambda t: {k: v for k, v in t.items() if not k.startswith("optim/")},
                            "optimizer: AdamW: buffer 1.b.m, 1.b.v, 1.w.m and 5 more missing after 2 steps"),
    "one-moment-missing": (without(V), "optimizer: AdamW: buffer 1.w.v missing after 2 steps"),
    "moment-wrong-shape": (lambda t: {**t, M: numpy.zeros((12, 8), numpy.float32)},
                           "optimizer: AdamW: buffer 1.w.m has shape (12, 8); its parameter has (8, 12)"),
    "moment-of-no-parameter": (lambda t: {**t, "optim/9.w.m": t[M]}, "optimizer: AdamW: unexpected buffer 9.w.m"),
}


@pytest.mark.parametrize("name", TENSOR_ATTACKS)
def test_hostile_tensors_are_refused(name, valid, tmp_path):
    change, words = TENSOR_ATTACKS[name]
    tensors, document = parts(valid)
    path = written(tmp_path / "c.safetensors", change(tensors), document)
    net = models.build(ARCHITECTURE)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    optimizer = optim.AdamW(net, lr=0.5)
    assert_refused(path, words, lambda p: load_checkpoint(p, net, optimizer))
    assert all(numpy.array_equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-done
    assert optimizer.steps == 0 and optimizer.buffers == {} and optimizer.lr == 0.5


def test_an_optimizer_of_another_kind_is_refused(valid):
    net = models.build(ARCHITECTURE)
    assert_refused(valid, "optimizer.name: the state of AdamW cannot load into SGD",
                   lambda p: load_checkpoint(p, net, optim.SGD(net)))


def test_loading_an_optimizer_from_a_checkpoint_without_one_is_refused(valid, tmp_path):
    tensors, document = parts(valid)
    del document["optimizer"]
    path = written(tmp_path / "c.safetensors", {k: v for k, v in tensors.items() if k.startswith("param/")}, document)
    net = models.build(ARCHITECTURE)
    assert_refused(path, "optimizer: missing", lambda p: load_checkpoint(p, net, optim.AdamW(net)))


def test_float16_weights_load_as_the_networks_float32(valid, tmp_path):
    tensors, document = parts(valid)
    half = {k: v.astype(numpy.float16) for k, v in tensors.items()}
    path = written(tmp_path / "c.safetensors", half, document)
    net = models.build(ARCHITECTURE)
    optimizer = optim.AdamW(net)
    load_checkpoint(path, net, optimizer)
    assert {v.dtype for v in net.state_dict().values()} == {numpy.dtype(numpy.float32)}
    assert {v.dtype for v in optimizer.buffers.values()} == {numpy.dtype(numpy.float32)}
    assert numpy.array_equal(net.state_dict()["1.w"], half[W].astype(numpy.float32))


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
METADATA = {"__metadata__": {"mnn": json.dumps({"mnn_version": "0", "architecture": {"name": "mlp"}})}}
HEADER_ATTACKS = {  # name: (file bytes, the words the error must hold)
    "empty-file": (b"", "truncated or not a safetensors file (0 bytes)"),
    "eight-bytes": (b"\x10" + b"\x00" * 7, "truncated"),
    "header-longer-than-the-file": ((1000).to_bytes(8, "little") + b'{"a": 1}', "truncated"),
    "header-length-2-to-the-64": (b"\xff" * 8 + b"{}", "truncated"),
    "header-a-list": (b"\x02" + b"\x00" * 7 + b"[]", "truncated or not a safetensors file"),
    "header-not-json": (b"\x05" + b"\x00" * 7 + b"{oops", "header: not valid JSON"),
    "header-bad-utf8": (b"\x04" + b"\x00" * 7 + b'{"\xff"', "header: not valid JSON"),
    "header-duplicate-key": (b"\x10" + b"\x00" * 7 + b'{"a": 1, "a": 2}', 'header: not valid JSON (key "a" appears'),
    "pickle": (pickle.dumps({"weights": [1, 2]}), "this is a pickle (or torch.save) file; mnn never unpickles"),
    "no-metadata": ({"param/w": ENTRY}, "__metadata__.mnn: missing; not a checkpoint written by mnn"),
    "metadata-without-mnn": ({"__metadata__": {"other": "x"}}, "__metadata__.mnn: missing"),
    "metadata-mnn-a-number": ({"__metadata__": {"mnn": 5}}, "__metadata__.mnn: missing"),
    "dtype-bfloat16": ({"param/w": {**ENTRY, "dtype": "BF16"}, **METADATA}, 'must be one of F16, F32, F64, got "BF16"'),
    "dtype-float8": ({"param/w": {**ENTRY, "dtype": "F8_E4M3"}, **METADATA}, "got \"F8_E4M3\""),
    "dtype-missing": ({"param/w": {"shape": [2], "data_offsets": [0, 8]}, **METADATA}, '"param/w".dtype: missing'),
    "shape-negative": ({"param/w": {**ENTRY, "shape": [-2]}, **METADATA}, '"param/w".shape[0]: must be an integer'),
    "shape-text": ({"param/w": {**ENTRY, "shape": "2"}, **METADATA}, '"param/w".shape: must be a list'),
    "shape-of-40-dimensions": ({"param/w": {**ENTRY, "shape": [1] * 40}, **METADATA}, "shape: must hold 0 to 32"),
    "offsets-of-three": ({"param/w": {**ENTRY, "data_offsets": [0, 4, 8]}, **METADATA}, "data_offsets: must hold"),
    "entry-not-an-object": ({"param/w": [1, 2], **METADATA}, '"param/w": must be an object'),
    "entry-field-unknown": ({"param/w": {**ENTRY, "evil": 1}, **METADATA}, '"param/w".evil: unknown field'),
}


def zip_file():
    import io
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps([1]))
    return buffer.getvalue()


HEADER_ATTACKS["torch-save-zip"] = (zip_file(), "this is a pickle (or torch.save) file")


@pytest.mark.parametrize("name", HEADER_ATTACKS)
def test_a_hostile_header_is_refused(name, tmp_path):
    content, words = HEADER_ATTACKS[name]
    path = tmp_path / "c.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        header_file(path, content, b"\x00" * 8)
    assert_refused(path, words, read_checkpoint)


def test_offsets_that_disagree_with_the_data_are_refused(tmp_path):
    document = {"mnn_version": "0", "architecture": {"name": "mlp", "kwargs": {"in_features": 1, "hidden": [],
                                                                               "classes": 1}}}
    header = {"param/0.w": {**ENTRY, "shape": [1, 1], "data_offsets": [0, 4]},
              "param/0.b": {**ENTRY, "shape": [1], "data_offsets": [0, 4]},
              "__metadata__": {"mnn": json.dumps(document)}}
    assert_refused(header_file(tmp_path / "c.safetensors", header, b"\x00" * 4), "corrupt checkpoint",
                   read_checkpoint)


def test_a_header_over_the_limit_is_refused_before_it_is_parsed(valid, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 100)
    assert_refused(valid, "bytes; at most 100 are read", read_checkpoint)


# -- what the path names ----------------------------------------------------------
def test_a_folder_is_refused(tmp_path):
    assert_refused(tmp_path, "a folder, not a regular file", read_checkpoint)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    assert_refused(path, "a FIFO (a pipe), not a regular file", read_checkpoint)  # no writer: a read would block


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        assert_refused(path, "a socket, not a regular file", read_checkpoint)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_dev_zero_is_refused_without_reading_it(tmp_path):
    assert_refused("/dev/zero", "a character device, not a regular file", read_checkpoint)
    (tmp_path / "link").symlink_to("/dev/zero")
    assert_refused(tmp_path / "link", "a character device", read_checkpoint)


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    assert_refused(tmp_path / "none.safetensors", "cannot read it: No such file or directory", read_checkpoint)


def test_a_file_is_read_no_further_than_its_size_when_opened(valid, monkeypatch):
    """What ``read_regular_file`` reads is bounded by fstat's size, not by what the file yields."""
    asked = []
    real_fdopen = os.fdopen

    def recording_fdopen(*args, **kwargs):
        handle = real_fdopen(*args, **kwargs)
        real_read = handle.read
        handle.read = lambda *size: asked.append(size) or real_read(*size)
        return handle

    monkeypatch.setattr(checkpoint.os, "fdopen", recording_fdopen)
    checkpoint.read_regular_file(valid)
    assert asked == [(valid.stat().st_size,)]

