"""What a run folder holds, by name: the checkpoints, the metrics, the curves."""
from pathlib import Path

CHECKPOINT = "checkpoint.safetensors"  # the last state: what --resume continues
BEST = "best.safetensors"  # the state with the best validation score so far
METRICS, CURVES = "metrics.json", "curves.png"
TEST_NUMBERS, CONFUSION = "test.json", "confusion.png"  # written by mnn test
RUN_FILES = (CHECKPOINT, BEST, METRICS, CURVES, TEST_NUMBERS, CONFUSION)


def checkpoint_file(path):
    """A checkpoint given as its file or as its run folder: then the run's best (by validation
    score) where it kept one, else its last."""
    path = Path(path)
    if not path.is_dir():
        return path
    return path / BEST if (path / BEST).is_file() else path / CHECKPOINT
