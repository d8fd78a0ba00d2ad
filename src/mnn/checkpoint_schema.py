"""What each field of a checkpoint's JSON document may hold, checked before anything is built.

A rule is a function ``rule(value, field)`` that returns nothing when ``value`` fits and
raises :class:`FieldError` naming ``field`` (a path such as ``config.lr`` or
``metrics[3].val_loss``) when it does not. Rules nest: ``record`` checks an object field by
field, ``list_of`` each item. The names follow JSON Schema's words (``minimum``,
``exclusive_maximum``), but the schema is plain code: a dict of field -> rule.

The same rules check a model's settings when ``models.resolve`` spells them out, so the
command line and a checkpoint are held to one standard.
"""
import collections
import json
import operator
import re

import numpy

from . import optim
from .files import counted
from .optim import is_finite_number, is_integer
from .runs import MAX_EPOCHS

MAX_DEPTH = 16  # objects and lists inside each other; mnn's own documents use 4
MAX_LAYERS = 1000  # hidden widths, CNN stages, GPT blocks
MAX_SIZE = 2 ** 31 - 1  # any one width, channel count, vocabulary or context length


class FieldError(ValueError):
    """A field of the document that is missing, of the wrong type, or out of range."""

    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field = field


def shown(value):
    """A short one-line picture of a value for an error message, in the file's own spelling."""
    if isinstance(value, dict):
        return f"an object with {len(value)} field{'' if len(value) == 1 else 's'}"
    if isinstance(value, list):
        return f"a list of {counted(len(value), 'item')}"
    try:
        text = json.dumps(value)  # null, true, NaN, "text", with newlines escaped
    except TypeError:  # not a JSON value: a caller's Python object
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def spelled(bound):
    """2**128 - 1 rather than its 39 digits."""
    return f"2**{bound.bit_length()} - 1" if bound > 2 ** 20 and (bound + 1) & bound == 0 else str(bound)


def child(field, key):
    return f"{field}.{key}" if field else str(key)


# -- rules for single values ----------------------------------------------
def integer(minimum=0, maximum=None):
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {spelled(maximum)}]"

    def rule(value, field):
        if not (is_integer(value) and value >= minimum and (maximum is None or value <= maximum)):
            raise FieldError(field, f"must be {expected}, got {shown(value)}")
    return rule


BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def number(minimum=None, maximum=None, exclusive_minimum=None, exclusive_maximum=None):
    """A finite int or float within the bounds given (none: any finite number)."""
    bounds = {">=": minimum, ">": exclusive_minimum, "<=": maximum, "<": exclusive_maximum}
    bounds = {sign: bound for sign, bound in bounds.items() if bound is not None}
    expected = ("a finite number " + " and ".join(f"{sign} {bound}" for sign, bound in bounds.items())).strip()

    def rule(value, field):
        if not (is_finite_number(value) and all(BOUNDS[sign](value, bound) for sign, bound in bounds.items())):
            raise FieldError(field, f"must be {expected}, got {shown(value)}")
    return rule


def boolean(value, field):
    if type(value) is not bool:
        raise FieldError(field, f"must be true or false, got {shown(value)}")


def text(value, field):
    if type(value) is not str:
        raise FieldError(field, f"must be a string, got {shown(value)}")


def choice(*options):
    def rule(value, field):
        if type(value) is not str or value not in options:
            raise FieldError(field, f"must be one of {', '.join(options)}, got {shown(value)}")
    return rule


def optional(inner):
    """``null`` or what ``inner`` accepts."""
    def rule(value, field):
        if value is not None:
            inner(value, field)
    return rule


def anything(value, field):
    """Any JSON value (its nesting is bounded by ``check_depth``)."""


# -- rules for containers -------------------------------------------------
def list_of(item, min_length=0, max_length=None):
    def rule(value, field):
        if type(value) is not list:
            raise FieldError(field, f"must be a list, got {shown(value)}")
        if len(value) < min_length or (max_length is not None and len(value) > max_length):
            most = counted(max_length, "item") if max_length is not None else None
            limits = (f"at least {counted(min_length, 'item')}" if max_length is None else f"exactly {most}"
                      if min_length == max_length else f"{min_length} to {most}")
            raise FieldError(field, f"must hold {limits}, got {len(value)}")
        for index, entry in enumerate(value):
            item(entry, f"{field}[{index}]")
    return rule


def mapping_of(item):
    """An object with any keys, each value accepted by ``item``."""
    def rule(value, field):
        if type(value) is not dict:
            raise FieldError(field, f"must be an object, got {shown(value)}")
        for key, entry in value.items():
            item(entry, child(field, key))
    return rule


def record(fields, optional_fields=(), extra=False):
    """An object with exactly these ``fields`` (name -> rule); ``optional_fields`` may be absent,
    and with ``extra`` other keys are allowed (and left unchecked)."""
    def rule(value, field):
        if type(value) is not dict:
            raise FieldError(field, f"must be an object, got {shown(value)}")
        for name in fields:
            if name in value:
                fields[name](value[name], child(field, name))
            elif name not in optional_fields:
                raise FieldError(child(field, name), "missing")
        unknown = sorted(value.keys() - fields.keys())
        if unknown and not extra:
            raise FieldError(child(field, unknown[0]), f"unknown field; expected {', '.join(fields)}")
    return rule


def check_depth(value, limit=MAX_DEPTH):
    """Refuse objects and lists nested deeper than ``limit`` (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise FieldError("document", f"objects and lists nested deeper than {limit} levels")
            pending.extend((entry, depth + 1) for entry in (item.values() if isinstance(item, dict) else item))


# -- model settings (also checked by models.resolve) -----------------------
SIZE = integer(1, MAX_SIZE)
WIDTHS = list_of(SIZE, max_length=MAX_LAYERS)
DROPOUT = number(minimum=0, exclusive_maximum=1)

MODEL_SETTINGS = {
    "mlp": {"in_features": SIZE, "hidden": WIDTHS, "classes": SIZE, "dropout": DROPOUT},
    "cnn": {"in_channels": SIZE, "image_size": SIZE, "channels": WIDTHS, "hidden": WIDTHS, "classes": SIZE,
            "dropout": DROPOUT, "batch_norm": boolean},
    "gpt": {"vocab_size": SIZE, "context": SIZE, "layers": integer(1, MAX_LAYERS), "heads": SIZE, "width": SIZE,
            "dropout": DROPOUT, "tie_weights": boolean, "bias": boolean},
    "lstm": {"vocab_size": SIZE, "context": SIZE, "width": SIZE, "hidden": list_of(SIZE, 1, MAX_LAYERS),
             "dropout": DROPOUT},
}


def check_model_settings(name, settings):
    """Raise FieldError naming the first of a model's settings (defaults filled in) that is out of range."""
    if name not in MODEL_SETTINGS:
        return
    record(MODEL_SETTINGS[name])(settings, "")
    if name == "gpt" and settings["width"] % settings["heads"]:
        raise FieldError("width", f"{settings['width']} is not divisible by heads = {settings['heads']}")
    if name == "cnn" and settings["image_size"] >> len(settings["channels"]) < 1:
        stages = len(settings["channels"])
        raise FieldError("image_size", f"{settings['image_size']} is too small for {stages} convolution stages, "
                                       f"each halving it (needs >= {2 ** stages})")


def architecture(value, field):
    """``{"name": ..., "kwargs": {...}}`` that ``models.resolve`` accepts."""
    from .models import resolve

    record({"name": text, "kwargs": mapping_of(anything)}, optional_fields=("kwargs",))(value, field)
    try:
        resolve(value)
    except ValueError as error:
        raise FieldError(field, str(error)) from error


# -- the optimizer, the training run ----------------------------------------
OPTIMIZER_CLASSES = {cls.__name__: cls for cls in optim.OPTIMIZERS.values()}


def optimizer_section(value, field):
    record({"name": choice(*OPTIMIZER_CLASSES), "settings": mapping_of(anything)})(value, field)
    try:
        OPTIMIZER_CLASSES[value["name"]].check_settings(value["settings"])
    except ValueError as error:
        raise FieldError(child(field, "settings"), str(error)) from error


def pcg64_state(value, field):
    """NumPy's ``PCG64().state``: a 128-bit state, an odd 128-bit increment, a buffered 32-bit half."""
    record({"bit_generator": choice("PCG64"),
            "state": record({"state": integer(0, 2 ** 128 - 1), "inc": integer(1, 2 ** 128 - 1)}),
            "has_uint32": integer(0, 1), "uinteger": integer(0, 2 ** 32 - 1)})(value, field)
    if value["state"]["inc"] % 2 == 0:
        raise FieldError(child(field, "state.inc"), "must be odd (PCG64 keeps its increment odd)")
    try:
        numpy.random.PCG64().state = value  # the final word is NumPy's own setter, on a throwaway generator
    except (TypeError, ValueError, OverflowError, KeyError) as error:
        raise FieldError(field, f"not a PCG64 state ({error})") from error


FINITE = number()
EVALUATION = record({"step": integer(0), "epoch": number(minimum=0), "train_loss": FINITE, "lr": number(minimum=0),
                     "val_loss": FINITE, "val_accuracy": number(minimum=0, maximum=1)},
                    optional_fields=("epoch", "val_accuracy"), extra=True)  # what resume and the plots read


def evaluation(value, field):
    """One evaluation's record: its step, losses and rate, and any other scores, all finite numbers."""
    EVALUATION(value, field)
    mapping_of(FINITE)(value, field)


METRICS = list_of(evaluation)
RUNNING_LOSS = list_of(FINITE, 2, 2)


def running_loss(value, field):
    """[sum of the losses since the last evaluation, how many]."""
    RUNNING_LOSS(value, field)
    integer(0)(value[1], f"{field}[1]")


def config_rules():
    """train.TrainConfig's fields -> rule; every field has its own (a test keeps it so)."""
    from .models import BUILDERS
    from .train import IMAGE_DATASETS, TEXT_DATASETS

    return {
        "model": choice(*BUILDERS), "model_kwargs": mapping_of(anything),
        "dataset": choice(*TEXT_DATASETS, *IMAGE_DATASETS), "epochs": number(exclusive_minimum=0, maximum=MAX_EPOCHS),
        "steps": integer(0), "batch_size": integer(1), "optimizer": choice(*optim.OPTIMIZERS),
        "lr": number(exclusive_minimum=0), "min_lr": number(minimum=0), "weight_decay": number(minimum=0),
        "decay_vectors": boolean, "beta2": number(minimum=0, exclusive_maximum=1),
        "momentum": number(minimum=0, exclusive_maximum=1), "warmup_steps": integer(0), "clip": number(minimum=0),
        "eval_every": integer(0), "seed": integer(0), "data_dir": optional(text), "limit": integer(0),
        "data": optional(text), "patience": integer(0),
    }


def config_fields(value, field):
    """Each field of a TrainConfig on its own, in range (``config`` checks how they fit together too)."""
    record(config_rules(), optional_fields=CONFIG_ADDED)(value, field)
    if (value["dataset"] == "custom") != (value.get("data") is not None):
        raise FieldError(child(field, "data"), "names the data set exactly when dataset is custom (--data), got "
                                               f"{shown(value.get('data'))} with dataset {value['dataset']}")


def config(value, field):
    """The run's TrainConfig as ``dataclasses.asdict`` wrote it: every field, each in range."""
    from .models import TEXT_MODELS
    from .train import TEXT_DATASETS

    config_fields(value, field)
    settings = MODEL_SETTINGS[value["model"]]
    for key, setting in value["model_kwargs"].items():
        if key not in settings:
            raise FieldError(child(field, f"model_kwargs.{key}"), f"not a setting of model {value['model']}")
        settings[key](setting, child(field, f"model_kwargs.{key}"))
    if value["min_lr"] > value["lr"]:
        raise FieldError(child(field, "min_lr"), f"{value['min_lr']} exceeds lr = {value['lr']}")
    if (value["model"] in TEXT_MODELS) != (value["dataset"] in TEXT_DATASETS):
        raise FieldError(child(field, "dataset"), f"model {value['model']} does not train on {value['dataset']}")


CONFIG_ADDED = ("data", "patience")  # TrainConfig fields newer than the first checkpoints, which lack them


# -- the whole document ----------------------------------------------------
def per_channel(rule):
    """One number for all channels, or a list of one per channel, each accepted by ``rule`` (how many
    channels the images have is checked against the architecture by ``check_input_fits_model``)."""
    channels = list_of(rule, 1)

    def check(value, field):
        (channels if type(value) is list else rule)(value, field)
    return check


def class_names(value, field):
    list_of(text, min_length=1)(value, field)
    if len(set(value)) != len(value):
        repeated = collections.Counter(value).most_common(1)[0][0]
        raise FieldError(field, f"class {shown(repeated)} is named more than once")


def vocabulary(value, field):
    text(value, field)
    if not value or len(set(value)) != len(value):
        raise FieldError(field, "must be a non-empty string of distinct characters")


def sha256_hex(value, field):
    text(value, field)
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FieldError(field, "must be 64 lowercase hexadecimal digits (a sha256)")


DOCUMENT = {
    "mnn_version": text,
    "architecture": architecture,
    "optimizer": optimizer_section,
    "config": config,
    "step": integer(0),
    "metrics": METRICS,
    "running_loss": running_loss,
    "rng_state": pcg64_state,
    # of pixels / 255, each in [0, 1]: a mean in [0, 1], a standard deviation in (0, 1/2]
    "normalizer": record({"mean": per_channel(number(minimum=0, maximum=1)),
                          "std": per_channel(number(minimum=1e-6, maximum=0.5))}),
    "classes": class_names,
    "input_shape": list_of(SIZE, 3, 3),  # (C, H, W) of the images a classifier takes
    "vocab": vocabulary,
    "data_sha256": sha256_hex,  # what a resumed run checks its data against
}
REQUIRED = ("mnn_version", "architecture")
RESUME_REQUIRED = ("optimizer", "config", "step", "metrics", "running_loss", "rng_state")


def check_document(document):
    """Raise FieldError for the first field of a checkpoint's document that is missing, of the wrong
    type or out of range. Fields mnn does not know (a caller's own metadata) are allowed."""
    if type(document) is not dict:
        raise FieldError("document", f"must be a JSON object, got {shown(document)}")
    check_depth(document)
    record(DOCUMENT, optional_fields=DOCUMENT.keys() - set(REQUIRED), extra=True)(document, "")
    check_task_fits_model(document)


def check_task_fits_model(document):
    """The vocabulary or class names agree with the architecture that uses them."""
    from .models import TEXT_MODELS, resolve

    model = resolve(document["architecture"])
    name, kwargs = model["name"], model["kwargs"]
    text_model = name in TEXT_MODELS
    if "vocab" in document and (not text_model or len(document["vocab"]) != kwargs["vocab_size"]):
        size = f"vocab_size = {kwargs['vocab_size']}" if text_model else f"a {name}"
        raise FieldError("vocab", f"{len(document['vocab'])} characters do not fit {size}")
    if "classes" in document and (text_model or len(document["classes"]) != kwargs["classes"]):
        size = f"a {name}" if text_model else f"classes = {kwargs['classes']}"
        raise FieldError("classes", f"{len(document['classes'])} class names do not fit {size}")
    if "normalizer" in document and (text_model or "config" not in document):
        raise FieldError("normalizer", "only an image classifier's checkpoint with its config holds one")
    check_input_fits_model(document, name, kwargs)


def check_input_fits_model(document, name, kwargs):
    """``input_shape`` (C, H, W) is what the architecture takes, and a per-channel normaliser has
    one mean and one deviation per channel."""
    shape = document.get("input_shape")
    if shape is not None:
        channels, height, width = shape
        if name == "mlp":
            fits, takes = kwargs["in_features"] == channels * height * width, f"{kwargs['in_features']} inputs"
        elif name == "cnn":
            size = kwargs["image_size"]
            fits = kwargs["in_channels"] == channels and size == height == width
            takes = f"{kwargs['in_channels']} channels of {size} x {size} pixels"
        else:
            fits, takes = False, "no images"
        if not fits:
            raise FieldError("input_shape", f"{shape} does not fit a {name} that takes {takes}")
    normalizer = document.get("normalizer")
    if normalizer is None:
        return
    mean, std = normalizer["mean"], normalizer["std"]
    if type(mean) is not list and type(std) is not list:
        return  # one mean and one deviation for every channel
    if type(mean) is not list or type(std) is not list or len(mean) != len(std):
        raise FieldError("normalizer", "mean and std must both be numbers or both lists of the same length")
    channels = shape[0] if shape is not None else kwargs.get("in_channels")
    if channels != len(normalizer["mean"]):
        known = f"{channels} channels" if channels is not None else "no input_shape"
        raise FieldError("normalizer.mean", f"{len(normalizer['mean'])} channel means do not fit {known}")


def check_resume_document(document):
    """On top of ``check_document``: everything ``Trainer.resume`` reads is there and consistent.

    The network the trainer builds from ``config`` must be the checkpoint's architecture: the
    run's model and each of its ``model_kwargs`` equal the architecture's, so the size of what
    gets built is the size the file's tensors hold."""
    from .models import resolve

    check_document(document)
    for name in RESUME_REQUIRED:
        if name not in document:
            raise FieldError(name, "missing (a training run's checkpoint holds it)")
    run, model = document["config"], resolve(document["architecture"])
    if run["model"] != model["name"]:
        raise FieldError("config.model", f"{run['model']} differs from the architecture's {model['name']}")
    try:
        settings = resolve({"name": run["model"], "kwargs": {**model["kwargs"], **run["model_kwargs"]}})["kwargs"]
    except ValueError as error:
        raise FieldError("config.model_kwargs", str(error)) from error
    for key, value in settings.items():
        if value != model["kwargs"][key]:
            raise FieldError(f"config.model_kwargs.{key}", f"{shown(value)} differs from the architecture's "
                                                           f"{shown(model['kwargs'][key])}")
    if OPTIMIZER_CLASSES[document["optimizer"]["name"]] is not optim.OPTIMIZERS[run["optimizer"]]:
        raise FieldError("optimizer.name", f"{document['optimizer']['name']} is not the run's {run['optimizer']}")
