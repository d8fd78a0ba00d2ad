"""What a run folder holds, by name: the checkpoints, the metrics, the curves."""
import tempfile
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


def make_run_folder(path):
    """The run folder, made if new and checked to take files: a run that cannot save must fail now,
    not at its first checkpoint, an epoch of training later."""
    path = Path(path)
    try:
        require_folder_or_nothing(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{path}: the run's files cannot be written there ({error.strerror or error})") from error


def require_folder_or_nothing(path):
    """A run folder may be new or a folder, not a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: a file, not a folder; a run's files go into a folder of its own")
