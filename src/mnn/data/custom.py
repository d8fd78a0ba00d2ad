"""Your own data set, ``mnn train --data PATH``, in one of three forms, checked as it is read.

**A folder of class folders** (torchvision's ImageFolder): ``PATH/<class name>/<image files>``.
The classes are the sub-folders, sorted by name; every PNG, JPEG, BMP, GIF, PPM/PGM, TIFF or
WebP file under one (sub-folders included) is an image of that class. Files with other
extensions, and names that start with a dot (``.DS_Store``, ``._photo.png``), are skipped.
The images are grey (1 channel) when every one of them is grey, else RGB (3 channels; an
alpha channel is dropped). All must have one size: mnn does not resize them.

**An .npz** (``numpy.savez``): ``x_train``, ``y_train`` and, optionally, ``x_test``,
``y_test``. Images are ``(N, H, W)`` (grey) or ``(N, C, H, W)``; channels-last
``(N, H, W, C)`` is refused with the transpose that fixes it.

**A .csv** with a header row, as Kaggle's MNIST and Fashion-MNIST: the column named
``label`` (else the first) holds the label, every other column one pixel of a square grey
image, row by row (784 columns: 28 x 28).

Pixels are raw values in [0, 255] (uint8, integers or floats; mnn normalises them), finite
and not all equal. Floats in [0, 1] pass too, but ``mnn predict`` feeds image files to the
model on the 0-255 scale: store what image files hold. Labels are integers or strings: the
classes are their distinct values, sorted (numbers by value), and named by them (``"0"``,
``"7"``, ``"cat"``). Labels 0..K-1 therefore stay themselves. Every problem is one line
naming the file (and the line, the key or the image).
"""
import csv
import math
import os
import re
import zipfile
from pathlib import Path

import numpy

from ..files import numpy_format, one_line
from .images import ImageDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit grey modes (and its 32-bit "I")
GREY_MODES = ("1", "L", "LA", "La", *SIXTEEN_BIT_MODES, "F")  # Pillow's grey image modes
MAX_BYTES = 4 << 30  # raw pixels an image folder may decode to (float32 training copies take 4 times more)
CSV_CHUNK = 1000  # rows parsed at a time
FORMS = "a folder of class folders of images, an .npz (x_train, y_train) or a .csv (label, pixels)"


def data_format(path):
    """``"folder"``, ``"npz"`` or ``"csv"``: what kind of data set ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} (--data) does not exist")
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in (".npz", ".csv"):
        return path.suffix.lower()[1:]
    raise ValueError(f"{path} (--data): expected {FORMS}; this file's name ends in neither .npz nor .csv")


def has_test_split(path):
    """Whether ``path`` holds a test split of its own: an .npz with ``x_test``."""
    if data_format(path) != "npz":
        return False
    with open_npz(path) as archive:
        return "x_test" in archive.files


def load_custom(path, split="train", classes=None, channels=None):
    """A data set in one of the three forms as an :class:`ImageDataset`, checked.

    ``split`` picks an .npz's ``x_train``/``y_train`` or ``x_test``/``y_test``; a folder or
    a CSV is one split, whole. With ``classes`` (a trained model's class names) the labels
    are mapped to them by name, and a label the model does not know is an error; integer
    labels (or class folders named 0, 1, ...) that are not all class names are class indices
    where none of the model's class names is an integer (a model trained on Fashion-MNIST's
    named classes), and an error where some are (which would they mean?). ``channels``
    makes an image folder's images grey (1) or RGB (3), as the model takes them.
    """
    path = Path(path)
    form = data_format(path)
    noun = "label"
    if form == "folder":
        images, raw_labels, name_of = read_image_folder(path, channels)
        where, noun = path, "class folder"
    elif form == "npz":
        images, raw_labels, name_of = read_npz(path, split)
        where = f"{path}: y_{split}"
    else:
        images, raw_labels, name_of = read_csv(path)
        where = path
    check_pixels(images, f"{path}: x_{split}" if form == "npz" else path, name_of, training=classes is None)
    labels, classes = label_indices(raw_labels, where, classes, noun)
    return ImageDataset(compact(images), labels, classes)


# -- checks common to the three forms ------------------------------------------
def check_pixels(images, path, name_of, training=True):
    """Raw pixels (N, C, H, W): at least one image, numbers, finite, in [0, 255], not all one value,
    and, in ``training`` images, no channel constant (it could not be normalised). ``name_of(i)``
    says where image i came from, for the error."""
    if len(images) == 0:
        raise ValueError(f"{path}: holds no images")
    if images.size == 0:
        raise ValueError(f"{path}: images of shape (C, H, W) = {tuple(images.shape[1:])} hold no pixels")
    if images.dtype.kind not in "uif":
        raise ValueError(f"{path}: pixels must be numbers, found {images.dtype}")
    if images.dtype.kind == "f":
        bad = ~numpy.isfinite(images)
        if bad.any():
            first = numpy.argwhere(bad)[0][0]
            raise ValueError(f"{path}: {numpy.count_nonzero(bad)} pixel values are NaN or infinite "
                             f"(the first in {name_of(first)})")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        first = numpy.argwhere((images < 0) | (images > 255))[0]
        raise ValueError(f"{path}: pixel value {images[tuple(first)]} in {name_of(first[0])} lies outside [0, 255]; "
                         "give raw pixels (mnn normalises them itself)")
    if low == high:
        raise ValueError(f"{path}: every pixel of every image is {low}: blank images")
    if training and images.shape[1] > 1:
        constant = numpy.flatnonzero(images.min(axis=(0, 2, 3)) == images.max(axis=(0, 2, 3)))
        if len(constant):
            raise ValueError(f"{path}: channel {constant[0]} is {images[0, constant[0], 0, 0]} in every pixel of every "
                             "image: it carries nothing and cannot be normalised; leave it out")


def compact(images):
    """Checked pixels as uint8 where every value is a whole number (no loss: the normalised images
    are the same), else as float32."""
    if images.dtype == numpy.uint8:
        return images
    if images.dtype.kind in "iu" or numpy.array_equal(images, numpy.floor(images)):
        return images.astype(numpy.uint8)
    return images.astype(numpy.float32)


def label_indices(raw, where, classes=None, noun="label"):
    """(int64 class indices, class names) for ``raw`` labels (integers or strings, one per image).

    Without ``classes``: the distinct labels, sorted, are the classes (at least two). With
    them: each label is looked up by name (see :func:`load_custom`)."""
    values, inverse = numpy.unique(raw, return_inverse=True)
    names = [str(value) for value in values.tolist()]
    if classes is None:
        if len(names) < 2:
            raise ValueError(f"{where}: every {noun} is {names[0]!r}: a classifier needs at least two classes")
        return inverse.reshape(-1).astype(numpy.int64), names
    classes = list(classes)
    lookup = {name: index for index, name in enumerate(classes)}
    known = f"the model's {len(classes)} classes ({preview(classes)})"
    integers = values.dtype.kind in "iu" or all(is_integer_name(name) for name in names)  # folders "0", "1", ...
    if not all(name in lookup for name in names) and integers and not any(map(is_integer_name, classes)):
        lookup = {str(index): index for index in range(len(classes))}  # integers are the class indices
        known = f"the class indices 0 to {len(classes) - 1}"
    unknown = [name for name in names if name not in lookup]
    if unknown:
        raise ValueError(f"{where}: {noun} {unknown[0]!r} is not one of {known} ({len(unknown)} such {noun}s)")
    mapping = numpy.array([lookup[name] for name in names], numpy.int64)
    return mapping[inverse.reshape(-1)], classes


def is_integer_name(name):
    try:
        return str(int(name)) == name
    except ValueError:
        return False


def preview(names, count=5):
    shown = ", ".join(map(repr, names[:count]))
    return shown + (", ..." if len(names) > count else "")


def label_array(labels, where):
    """An .npz's labels as integers, or as strings (stripped) where any is not an integer, as a CSV's."""
    if labels.dtype.kind in "iu":
        if labels.size and labels.dtype.kind == "u" and int(labels.max()) >= 2 ** 63:
            raise ValueError(f"{where}: label {int(labels.max())} does not fit in 64 signed bits")
        return labels.astype(numpy.int64)
    if labels.dtype.kind not in "SU":
        raise ValueError(f"{where}: labels must be integers or strings, found {labels.dtype}"
                         + (" (whole numbers? save them with y.astype(int))" if labels.dtype.kind == "f" else ""))
    try:
        texts = numpy.char.strip(labels.astype(str))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: labels are bytes that are not text ({error})") from error
    empty = numpy.flatnonzero(texts == "")
    if len(empty):
        raise ValueError(f"{where}: label {empty[0]} is empty")
    if all(is_integer_text(text) for text in texts.tolist()):
        return numpy.array([integer_label(text) for text in texts.tolist()], numpy.int64)
    return texts


# -- an .npz ---------------------------------------------------------------------
def open_npz(path):
    try:
        if numpy_format(path) is None:  # numpy.load would take it for a pickle, and say so
            raise ValueError("its first bytes are neither a zip archive's nor NumPy's")
        archive = numpy.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not an .npz archive that can be read ({one_line(error)})") from error
    if not hasattr(archive, "files"):
        raise ValueError(f"{path}: one array (.npy), not an .npz archive of x_train, y_train (numpy.savez)")
    return archive


def read_npz(path, split):
    """(images (N, C, H, W), labels, name of image i) of one split of an .npz."""
    with open_npz(path) as archive:
        keys = set(archive.files)
        if ("x_test" in keys) != ("y_test" in keys):
            present, absent = ("x_test", "y_test") if "x_test" in keys else ("y_test", "x_test")
            raise ValueError(f"{path}: holds {present} without {absent}")
        wanted = (f"x_{split}", f"y_{split}")
        if not set(wanted) <= keys:
            found = ", ".join(sorted(keys)) or "no arrays"
            if split == "test":
                raise ValueError(f"{path}: holds no test split (x_test, y_test), only {found}")
            raise ValueError(f"{path}: holds {found}; expected x_train and y_train (and optionally x_test, y_test)")
        images, labels = (read_member(archive, key, path) for key in wanted)
    x_key, y_key = wanted
    images = image_array(images, f"{path}: {x_key}")
    if labels.ndim != 1:
        raise ValueError(f"{path}: {y_key}: expected one label per image, found an array of shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {x_key} holds {len(images)} images but {y_key} holds {len(labels)} labels")
    return images, label_array(labels, f"{path}: {y_key}"), lambda i: f"{x_key}[{i}]"


def read_member(archive, key, path):
    try:
        return archive[key]
    except Exception as error:  # a corrupt member raises zlib.error, BadZipFile, EOFError, ValueError, ...
        raise ValueError(f"{path}: {key} cannot be read ({type(error).__name__}: {one_line(error)})") from error


def image_array(array, where):
    """``(N, H, W)`` or ``(N, C, H, W)`` as ``(N, C, H, W)``."""
    if array.dtype.kind not in "uif":
        raise ValueError(f"{where}: pixels must be numbers, found {array.dtype}")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{where}: expected images (N, H, W) or (N, C, H, W), found an array of shape {array.shape}")
    if array.shape[3] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        raise ValueError(f"{where}: shape {array.shape} looks channels-last (N, H, W, C); mnn takes (N, C, H, W): "
                         "save x.transpose(0, 3, 1, 2)")
    return array


# -- a .csv ----------------------------------------------------------------------
def read_csv(path):
    """(images (N, 1, S, S), labels, name of image i) of a CSV: a header, then label and S*S pixels a row."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")  # -sig: a byte-order mark (Excel) is no column name
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from error
    with handle:
        reader = csv.reader(handle)
        try:
            return read_csv_rows(reader, path)
        except UnicodeDecodeError as error:  # decoded in blocks: the line is not known
            raise ValueError(f"{path}: not UTF-8 text ({one_line(error)})") from error
        except csv.Error as error:
            raise ValueError(f"{path} line {reader.line_num}: {one_line(error)}") from error


def read_csv_rows(reader, path):
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise ValueError(f"{path}: empty; expected a header row (label,pixel1,pixel2,...), then one image a row")
    columns = [cell.strip() for cell in header]
    if all(is_number(cell) for cell in columns):
        raise ValueError(f"{path}: the first row holds numbers, not column names; a CSV needs a header row "
                         "(label,pixel1,pixel2,...)")
    named = [index for index, name in enumerate(columns) if name.lower() == "label"]
    if len(named) > 1:
        raise ValueError(f"{path}: {len(named)} columns are named label")
    label_column = named[0] if named else 0
    pixel_names = columns[:label_column] + columns[label_column + 1:]
    side = math.isqrt(len(pixel_names))
    if not pixel_names or side * side != len(pixel_names):
        hint = " (the header's last column has no name: a trailing comma?)" if not columns[-1] else ""
        raise ValueError(f"{path}: {len(pixel_names)} pixel columns besides the label {columns[label_column]!r}: "
                         f"not a square number; each row holds one square grey image (784 = 28 x 28 pixels){hint}")
    labels, lines, blocks, rows, row_lines = [], [], [], [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(columns):
            raise ValueError(f"{path} line {reader.line_num}: {len(row)} values, but the header names "
                             f"{len(columns)} columns")
        label = row.pop(label_column).strip()
        if not label:
            raise ValueError(f"{path} line {reader.line_num}: no label in column {columns[label_column]!r}")
        labels.append(label)
        lines.append(reader.line_num)
        rows.append(row)
        row_lines.append(reader.line_num)
        if len(rows) == CSV_CHUNK:
            blocks.append(parse_pixels(rows, row_lines, pixel_names, path))
            rows, row_lines = [], []
    if rows:
        blocks.append(parse_pixels(rows, row_lines, pixel_names, path))
    if not labels:
        raise ValueError(f"{path}: a header but no rows: holds no images")
    images = numpy.concatenate(blocks).reshape(len(labels), 1, side, side)
    integers = all(is_integer_text(label) for label in labels)
    raw = numpy.array([integer_label(label) for label in labels], numpy.int64) if integers else numpy.array(labels)
    return images, raw, lambda i: f"line {lines[i]}"


def parse_pixels(rows, lines, names, path):
    """The pixel cells of some rows as float32 (rows, pixels); a cell that is no number is named."""
    try:
        return numpy.loadtxt([",".join(row) for row in rows], delimiter=",", dtype=numpy.float32, ndmin=2,
                             comments=None)
    except ValueError as error:
        for row, line in zip(rows, lines):
            for cell, name in zip(row, names):
                if not is_number(cell.strip()):
                    raise ValueError(f"{path} line {line}: column {name!r} holds {cell.strip()!r}, not a number") \
                        from None
        raise ValueError(f"{path}: {one_line(error)}") from error


def is_number(text):
    """Whether a CSV cell is a number as NumPy reads one (Python's ``float`` also takes "1_000")."""
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


WHOLE_FLOAT = re.compile(r"\s*([+-]?\d+)\.0*\s*")  # "7.0", as pandas writes an integer column with gaps


def integer_label(text):
    """The integer a label spells, "7" or "7.0", if it fits in 64 bits; else None."""
    whole = WHOLE_FLOAT.fullmatch(text)
    try:
        value = int(whole.group(1) if whole else text)
    except ValueError:
        return None
    return value if "_" not in text and -2 ** 63 <= value < 2 ** 63 else None


def is_integer_text(text):
    """Whether ``text`` is an integer label (see ``integer_label``)."""
    return integer_label(text) is not None


# -- a folder of class folders ---------------------------------------------------
def read_image_folder(path, channels=None):
    """(images (N, C, H, W) uint8, class-folder name of each image, file of image i)."""
    from PIL import Image

    folders = sorted(entry for entry in path.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise ValueError(f"{path}: no class folders in it; an image folder holds one folder per class: "
                         f"{path}/<class name>/<image files>")
    files, names = [], []
    for folder in folders:
        found = image_files(folder)
        if not found:
            raise ValueError(f"{folder}: an empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files in it)")
        files += found
        names += [folder.name] * len(found)
    width, height, modes = image_size_and_modes(files, path, Image)
    if channels is None:
        channels = 1 if modes <= set(GREY_MODES) else 3
    if channels not in (1, 3):
        raise ValueError(f"{path}: the model takes images of {channels} channels; an image folder gives grey (1) "
                         "or RGB (3) ones")
    size = len(files) * channels * height * width
    if size > MAX_BYTES:
        raise ValueError(f"{path}: {len(files)} images of {width} x {height} pixels are {size / 2 ** 30:.1f} GiB of "
                         f"pixels, more than the {MAX_BYTES >> 30} GiB mnn reads; make them smaller")
    images = numpy.empty((len(files), channels, height, width), numpy.uint8)
    for index, file in enumerate(files):
        try:
            with Image.open(file) as image:
                pixels = numpy.asarray(eight_bit(image, channels))
        except ImageModeError as error:
            raise ValueError(f"{file}: {error}") from error
        except Exception as error:  # Pillow raises many kinds for a file it cannot decode
            raise ValueError(f"{file}: cannot be decoded ({one_line(error)})") from error
        images[index] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return images, numpy.array(names), lambda i: str(files[i])


class ImageModeError(ValueError):
    """An image whose pixels mnn cannot map onto 0-255."""


def eight_bit(image, channels):
    """A Pillow image as 8-bit grey (``channels`` 1) or RGB (3). Pillow's own conversion clips 16-bit
    grey at 255, which would turn most such images white: they are scaled instead, 65535 to 255 (mode
    I, Pillow's 32-bit integers, in which older Pillows open 16-bit PNGs, is taken as 16-bit too).
    Floating-point images (mode F) have no agreed range, and are refused."""
    from PIL import Image

    if image.mode == "F":
        raise ImageModeError("a floating-point image (Pillow mode F), whose pixel range is unknown; "
                         "save it with 8 or 16 bits per pixel")
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = numpy.asarray(image).astype(numpy.float64) * (255 / 65535)
        image = Image.fromarray(numpy.clip(numpy.rint(pixels), 0, 255).astype(numpy.uint8))  # grey, "L"
    return image.convert("L" if channels == 1 else "RGB")


def image_files(folder):
    """The image files under ``folder``, sub-folders included, sorted; hidden ones left out."""
    found = []
    for root, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [Path(root) / name for name in sorted(names)
                  if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def image_size_and_modes(files, path, Image):
    """The one size every image has (read from the headers), and the set of their modes."""
    first, modes = None, set()
    for file in files:
        try:
            with Image.open(file) as image:
                size, mode = image.size, image.mode
        except Exception as error:
            raise ValueError(f"{file}: not an image that can be read ({one_line(error)})") from error
        if first is None:
            first = (file, size)
        elif size != first[1]:
            raise ValueError(f"{path}: images of different sizes: {first[0]} is {first[1][0]} x {first[1][1]}, "
                             f"{file} is {size[0]} x {size[1]} pixels; resize them to one size (mnn does not)")
        modes.add(mode)
    return (*first[1], modes)
