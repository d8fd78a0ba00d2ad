"""The schema behind checkpoints and model settings: parameter counts without building, range checks."""
import dataclasses
import inspect

import numpy
import pytest

from mnn import checkpoint_schema as schema
from mnn import models
from mnn.train import TrainConfig

ARCHITECTURES = [
    {"name": "mlp", "kwargs": {}},
    {"name": "mlp", "kwargs": {"in_features": 10, "hidden": [7, 5, 3], "classes": 4, "dropout": 0.0}},
    {"name": "mlp", "kwargs": {"in_features": 3, "hidden": [], "classes": 2}},
    {"name": "cnn", "kwargs": {}},
    {"name": "cnn", "kwargs": {"batch_norm": False}},
    {"name": "cnn", "kwargs": {"in_channels": 3, "image_size": 16, "channels": [3, 5, 7], "hidden": []}},
    {"name": "cnn", "kwargs": {"image_size": 9, "channels": [], "hidden": [4, 4], "classes": 3}},
    {"name": "cnn", "kwargs": {"image_size": 17, "channels": [2, 2, 2, 2], "batch_norm": False}},
    {"name": "gpt", "kwargs": {"vocab_size": 65}},
    {"name": "gpt", "kwargs": {"vocab_size": 65, "tie_weights": True}},
    {"name": "gpt", "kwargs": {"vocab_size": 11, "context": 5, "layers": 3, "heads": 2, "width": 8, "bias": True}},
    {"name": "gpt", "kwargs": {"vocab_size": 7, "context": 3, "layers": 2, "heads": 4, "width": 8, "bias": True,
                               "tie_weights": True, "dropout": 0.1}},
    {"name": "lstm", "kwargs": {"vocab_size": 65}},
    {"name": "lstm", "kwargs": {"vocab_size": 7, "context": 3, "width": 5, "hidden": [4, 6, 3], "dropout": 0.1}},
]


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: f"{a['name']}-{len(a['kwargs'])}")
def test_parameter_count_equals_the_built_networks(architecture):
    net = models.build(architecture)
    assert models.parameter_count(architecture) == sum(p.size for p in net.params.values())
    assert models.parameter_count(architecture, buffers=True) == sum(v.size for v in net.state_dict().values())


def test_parameter_count_of_a_huge_architecture_is_instant():
    huge = {"name": "gpt", "kwargs": {"vocab_size": 2 ** 31 - 1, "layers": 1000, "width": 2 ** 31 - 1, "heads": 1}}
    assert models.parameter_count(huge) > 10 ** 21


@pytest.mark.parametrize("name", models.BUILDERS)
def test_every_model_setting_has_a_rule(name):
    assert set(schema.MODEL_SETTINGS[name]) == set(inspect.signature(models.BUILDERS[name]).parameters)


BAD_SETTINGS = [  # (architecture, what the ValueError must say)
    ({"name": "mlp", "kwargs": {"hidden": "abc"}}, "model 'mlp': hidden: must be a list"),
    ({"name": "mlp", "kwargs": {"hidden": [0]}}, "model 'mlp': hidden[0]: must be an integer in [1, 2**31 - 1]"),
    ({"name": "mlp", "kwargs": {"in_features": -1}}, "model 'mlp': in_features: must be"),
    ({"name": "mlp", "kwargs": {"classes": True}}, "model 'mlp': classes: must be"),
    ({"name": "mlp", "kwargs": {"dropout": 1.0}}, "model 'mlp': dropout: must be a finite number >= 0 and < 1"),
    ({"name": "mlp", "kwargs": {"dropout": float("nan")}}, "model 'mlp': dropout: must be"),
    ({"name": "cnn", "kwargs": {"channels": [8] * 5}}, "model 'cnn': image_size: 28 is too small for 5"),
    ({"name": "cnn", "kwargs": {"batch_norm": 1}}, "model 'cnn': batch_norm: must be true or false"),
    ({"name": "gpt", "kwargs": {"vocab_size": 65, "heads": 0}}, "model 'gpt': heads: must be"),
    ({"name": "gpt", "kwargs": {"vocab_size": 65, "heads": 3}}, "model 'gpt': width: 128 is not divisible by heads"),
    ({"name": "gpt", "kwargs": {"vocab_size": 65, "layers": 10 ** 7}}, "model 'gpt': layers: must be an integer in"),
    ({"name": "gpt", "kwargs": {"vocab_size": 65, "width": "wide"}}, "model 'gpt': width: must be"),
    ({"name": "gpt", "kwargs": {"vocab_size": 0}}, "model 'gpt': vocab_size: must be"),
]


@pytest.mark.parametrize("architecture, message", BAD_SETTINGS)
def test_resolve_refuses_settings_out_of_range(architecture, message):
    with pytest.raises(ValueError) as caught:
        models.resolve(architecture)
    assert message in str(caught.value)
    with pytest.raises(ValueError):  # nothing is built
        models.build(architecture)


def test_numpy_integers_are_settings_too():
    assert models.resolve({"name": "mlp", "kwargs": {"hidden": [numpy.int64(8)]}})["kwargs"]["hidden"] == [8]


@pytest.mark.parametrize("overrides", [{}, {"model": "gpt", "dataset": "tinyshakespeare", "min_lr": 3e-4,
                                            "model_kwargs": {"layers": 2}}, {"model": "cnn", "epochs": 12.5}])
def test_a_train_config_as_trainer_saves_it_fits_the_schema(overrides):
    schema.config(dataclasses.asdict(TrainConfig(**overrides)), "config")


def test_every_train_config_field_has_a_rule_and_older_checkpoints_may_lack_the_new_ones():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(schema.config_rules()) == set(fields)
    first = fields[:fields.index("limit") + 1]  # the fields of the first checkpoints, which end at limit
    assert set(fields) - set(first) == set(schema.CONFIG_ADDED)


def test_rng_states_numpy_makes_are_accepted():
    rng = numpy.random.default_rng(12345)
    for draw in range(20):
        rng.integers(0, 2 ** 31, dtype=numpy.uint32, size=draw % 3 + 1)  # leaves half a 64-bit word buffered
        schema.pcg64_state(rng.bit_generator.state, "rng_state")


def test_error_values_are_shown_short_and_on_one_line():
    assert schema.shown("a\nb") == '"a\\nb"'
    assert schema.shown(float("nan")) == "NaN" and schema.shown(None) == "null" and schema.shown(True) == "true"
    assert len(schema.shown("x" * 10_000)) == 40
    assert schema.shown([1, 2]) == "a list of 2 items" and schema.shown({"a": 1}) == "an object with 1 field"
    assert schema.shown(object()).startswith("<object")
