"""Types for command-line flags: each checks its value where it is parsed, with a one-line error.

argparse calls a flag's ``type`` on the text given; an ``ArgumentTypeError`` becomes
``mnn train: error: argument --lr: must be a finite number > 0, got 'nan'``.
"""
import argparse
import math
import os


def integer(minimum, maximum=None):
    """An integer flag of at least ``minimum`` (and at most ``maximum``, if given)."""
    requirement = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if value < minimum or maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value
    parse.__name__ = requirement
    return parse


def path_argument(value):
    """A path: not empty (that would mean the current folder), a leading ``~`` made the home folder, as a
    shell does where the ``~`` starts a word but not after ``--out=``."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return os.path.expanduser(value)


def number(low, high=math.inf, low_inclusive=False, high_inclusive=False):
    """A finite real flag in the interval from ``low`` to ``high`` (open unless told otherwise)."""
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    requirement = f"must be a number > {low:g}" if high == math.inf and not low_inclusive else \
        f"must be a number >= {low:g}" if high == math.inf else f"must lie in {interval}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}") from None
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
        return value
    parse.__name__ = requirement.removeprefix("must ")
    return parse


def widths(text):
    """Comma-separated layer widths, each an integer >= 1: ``512,256``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, e.g. 512,256; got {text!r}")
    return [integer(1)(part) for part in parts]


positive_int, count = integer(1), integer(0)
positive, non_negative = number(0), number(0, low_inclusive=True)
probability = number(0, 1, low_inclusive=True)  # [0, 1): dropout, Adam's betas
