"""What a run folder holds, by name: the checkpoints, the metrics, the curves."""
import contextlib
import os
import tempfile
from pathlib import Path

CHECKPOINT = "checkpoint.safetensors"  # the last state: what --resume continues
BEST = "best.safetensors"  # the state with the best validation score so far
METRICS, CURVES = "metrics.json", "curves.png"
TEST_NUMBERS, CONFUSION = "test.json", "confusion.png"  # written by mnn test
RUN_FILES = (CHECKPOINT, BEST, METRICS, CURVES, TEST_NUMBERS, CONFUSION)
MAX_EPOCHS = 10**6  # more passes than a run makes: its step count must stay an integer one can count to
LOCK = ".mnn-train.lock"  # held by the process that trains the run, while it does


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


@contextlib.contextmanager
def held_run_folder(path, make=True):
    """The run folder, for this process alone while the block runs: made if new (``make``), and locked,
    so that a second ``mnn train`` on it (a ``--resume`` while the run goes on) is refused rather than
    let the two delete each other's half-written files. Folders made here and left without a run's
    file by a failure (a run that diverged before its first checkpoint) are removed again."""
    path = Path(path)
    made = folders_missing(path) if make else []
    if make:
        make_run_folder(path)
    try:
        lock = locked(path / LOCK)
        try:
            yield path
        finally:
            unlock(lock, path / LOCK)
    except BaseException:
        if made and not any((path / name).exists() for name in RUN_FILES):
            remove_empty(made)
        raise


def folders_missing(path):
    """``path`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty(folders):
    """Remove these folders, innermost first, while they are empty: nothing of anyone's is removed."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def locked(path):
    """A descriptor of ``path`` locked (``flock``) by this process, or a ValueError if another holds it.
    The lock goes with the process, however it ends. Where there is no lock to take, nothing is locked:
    on Windows (no ``flock``), in a folder this user cannot write (a finished run kept read-only: a run
    that goes on fails on its first file, naming it), on a file system without locks."""
    try:
        import fcntl
    except ImportError:
        return None
    while True:
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # a lock needs no write access
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ValueError(f"{path.parent}: another `mnn train` is training this run now; wait for it to end "
                             "(Ctrl-C in it saves and stops) before training the run again") from None
        except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP: a file system without locks (Lustre without its flock option)
            os.close(descriptor)
            return None
        if is_same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # its last holder removed the file as we opened it: lock the one there now


def is_same_file(descriptor, path):
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def unlock(descriptor, path):
    """Remove the lock file, then let go of it (in that order: a waiting process then locks a new file)."""
    if descriptor is not None:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(descriptor)
