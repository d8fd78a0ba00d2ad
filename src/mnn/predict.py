"""Use what you trained: ``mnn.load(path)`` gives a ready model, raw images or text in.

    model = mnn.load("runs/mlp-...")              # the run folder or its checkpoint file
    model.predict(images)                          # class indices, images as raw pixels 0-255
    model.predict_proba(["shoe.png"])              # probabilities, from image files too
    mnn.load("runs/gpt-...").generate("ROMEO:", tokens=200)

The model is in eval mode (no dropout, batch norm's running statistics) and brings the
normaliser or the tokenizer it was trained with, so inputs need no preparation.
"""
import warnings
from pathlib import Path

import numpy

from . import backend
from .checkpoint import load_checkpoint
from .data.custom import IMAGE_EXTENSIONS, ImageModeError, eight_bit
from .data.images import Normalizer
from .data.text import CharTokenizer
from .files import numpy_format, one_line
from .generate import generate
from .layers.softmax import softmax
from .runs import checkpoint_file

def load(path):
    """The model saved at ``path`` (a run folder or a checkpoint file), ready to use."""
    path = checkpoint_file(path)
    net, document = load_checkpoint(path)
    net.eval()
    if "vocab" in document:
        return TextModel(net, document, path)
    if "normalizer" in document:
        return Classifier(net, document, path)
    raise ValueError(f"{path}: holds neither a classifier's normaliser nor a text model's vocabulary")


class Classifier:
    """An image classifier with its normaliser and class names."""

    def __init__(self, net, document, path):
        self.net, self.path = net, path
        count = document["architecture"]["kwargs"]["classes"]
        self.classes = list(document.get("classes", map(str, range(count))))  # older files hold no names: numbers
        self.normalizer = Normalizer(**document["normalizer"])
        self.input_shape = input_shape(document)

    def __repr__(self):
        return f"Classifier({self.path}, input {self.input_shape}, classes {self.classes})"

    def predict_proba(self, images, chunk=1000):
        """Class probabilities, one row per image: raw pixels (0-255) or image file paths."""
        pixels = self.as_pixels(images)
        self.net.eval()  # again: someone may have switched the network to training meanwhile
        rows = []
        for start in range(0, len(pixels), chunk):
            x = backend.to_device(self.normalizer(pixels[start:start + chunk]))
            rows.append(softmax(backend.to_numpy(self.net(x)).astype(numpy.float64)))
        return numpy.concatenate(rows) if rows else numpy.zeros((0, len(self.classes)))

    def predict(self, images):
        """The most probable class index of each image (``self.classes`` names them)."""
        return self.predict_proba(images).argmax(axis=1)

    def as_pixels(self, images):
        """A batch ``(N, C, H, W)`` of raw pixel values from files (images or ``.npy`` arrays, as
        ``mnn predict`` takes them), one image, or a batch."""
        if isinstance(images, (str, Path)):
            images = [images]
        if isinstance(images, (list, tuple)) and all(isinstance(i, (str, Path)) for i in images):
            batches = [batch_of_file(path, self.input_shape) if Path(path).suffix.lower() == ".npy" else
                       read_image(path, self.input_shape)[None] for path in images]  # Pillow tells the others
            return numpy.concatenate(batches) if batches else numpy.zeros((0, *self.input_shape), numpy.uint8)
        return batch_of(numpy.asarray(images), self.input_shape)


class TextModel:
    """A character-level language model with its tokenizer."""

    def __init__(self, net, document, path):
        self.net, self.path = net, path
        self.tokenizer = CharTokenizer(document["vocab"])
        self.context = document["architecture"]["kwargs"]["context"]

    def __repr__(self):
        return f"TextModel({self.path}, {len(self.tokenizer)} characters, context {self.context})"

    def generate(self, prompt=None, tokens=500, temperature=0.8, top_k=0, seed=0, on_text=None):
        """``prompt`` and ``tokens`` sampled characters (temperature 0: always the likeliest; ``prompt`` None:
        a newline, or the vocabulary's first character where the text had none)."""
        return generate(self.net, self.tokenizer, prompt, tokens, self.context, temperature, top_k, seed, on_text)


def input_shape(document):
    """(C, H, W) of the images the network takes, from the checkpoint."""
    if "input_shape" in document:
        return tuple(document["input_shape"])
    kwargs = document["architecture"]["kwargs"]
    if "image_size" in kwargs:
        return kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]
    side = round(kwargs["in_features"] ** 0.5)
    if side * side != kwargs["in_features"]:
        raise ValueError(f"an MLP of {kwargs['in_features']} inputs: the image shape is not recorded")
    return 1, side, side


def batch_of(images, shape):
    """Raw images as a batch shaped ``(N, *shape)``: one image or a batch, grey ones without a channel axis."""
    if images.dtype.kind not in "uif":
        raise ValueError(f"images must be raw pixel values in [0, 255] (the model normalises them), got {images.dtype}")
    if images.size == 0:
        raise ValueError(f"no images: an array of shape {images.shape}")
    if not (0 <= images.min() and images.max() <= 255):
        raise ValueError(f"images must be raw pixel values in [0, 255] (the model normalises them), got "
                         f"{images.dtype} values in [{images.min()}, {images.max()}]")
    wrong_shape = ValueError(f"images of shape {images.shape}; the model takes {shape} images (C, H, W), "
                             f"one or a batch (a grey image may leave out C)")
    if not 2 <= images.ndim <= 4:
        raise wrong_shape
    candidates = {4: [images], 3: [images[None], images[:, None]], 2: [images[None, None]]}[images.ndim]
    for candidate in candidates:
        if tuple(candidate.shape[1:]) == tuple(shape):
            return candidate
    raise wrong_shape


def read_image(path, shape):
    """An image file as raw pixels ``(C, H, W)``: grey or RGB as the model takes, resized to its size."""
    from PIL import Image

    require_regular_file(path)
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"{path}: an image file gives grey or RGB pixels, and the model takes {channels} channels: "
                         f"give them as a .npy array ({channels}, {height}, {width}) or a batch of them")
    try:
        with warnings.catch_warnings():  # Pillow warns of a very large image: the file was asked for by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = eight_bit(image, channels).resize((width, height), Image.BILINEAR)
                pixels = numpy.asarray(image, dtype=numpy.uint8)
    except ImageModeError as error:
        raise ValueError(f"{path}: {error}") from error
    except MemoryError:
        raise
    except Exception as error:  # Pillow raises many kinds for a file it cannot decode (or refuses, too large)
        raise ValueError(f"{path}: not an image that can be read ({one_line(error)})") from error
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def read_inputs(paths, shape):
    """Image files and ``.npy`` arrays of raw pixels as one batch, with a name for each image."""
    names, batches = [], []
    for path in map(Path, paths):
        require_regular_file(path)
        if path.suffix.lower() == ".npy":
            images = batch_of_file(path, shape)
            names += [f"{path}[{i}]" for i in range(len(images))] if len(images) > 1 else [str(path)]
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images = read_image(path, shape)[None]
            names.append(str(path))
        else:
            raise ValueError(f"{path}: expected an image ({', '.join(IMAGE_EXTENSIONS)}) or a .npy array")
        batches.append(images)
    return names, numpy.concatenate(batches)


def batch_of_file(path, shape):
    """``batch_of`` the array in a ``.npy`` file, any error naming the file."""
    try:
        if numpy_format(path) != "npy":  # numpy.load would take it for a pickle, and say so
            raise ValueError("not a .npy array (numpy.save writes one): its first bytes are not NumPy's format")
        return batch_of(numpy.load(path, allow_pickle=False), shape)
    except (ValueError, OSError, EOFError, MemoryError) as error:  # a damaged file, or one declaring a huge array
        raise ValueError(f"{path}: {error}") from error


def require_regular_file(path):
    """Refuse what is not a plain file: a FIFO or a device would block a read, or never end it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: a folder, not a file" if path.is_dir() else
                         f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
