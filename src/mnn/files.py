"""Files written whole or not at all: checkpoints, metrics, pictures, downloads.

A temporary file beside the target, fsync, rename, fsync of the folder: a crash at any
moment leaves either the old file or the new one under the name, never a mix. The file
gets the mode any new file gets under the umask (``tempfile.mkstemp`` alone gives 0600).
"""
import contextlib
import errno
import glob
import os
import shlex
import stat
import sys
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it into place.

    A failure midway leaves any previous ``path`` intact, no partial file under its name
    and no temporary file; a process killed midway leaves a ``.NAME.*.tmp`` file that
    ``remove_stale_temporaries`` clears. What ``write`` raises passes unchanged (a download's
    network error is no disk's), except a full or failing disk; those errors, as the file
    operations' own, name ``path``.
    """
    path = Path(path)
    with told_as_writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            with told_as_writing(path, only=DISK_ERRORS):
                write(handle)
            with told_as_writing(path):
                handle.flush()
                os.fsync(handle.fileno())
        with told_as_writing(path):
            os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    with told_as_writing(path):
        sync_folder(path.parent)
    return path


DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def told_as_writing(path, only=None):
    """An OSError inside (of the ``only`` errno values, if given), told of the file asked for rather
    than of the hidden temporary one."""
    try:
        yield
    except OSError as error:
        if error.errno is None or only is not None and error.errno not in only:
            raise
        why = error.strerror
        if isinstance(error, FileExistsError):  # from mkdir
            why = "a file stands where a folder of its path should be"
        raise type(error)(error.errno, f"cannot write {path} ({why})") from error


def current_umask():
    """The process's umask. It can only be read by setting it: set a strict one for that instant."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def sync_folder(folder):
    """fsync a folder, so that a rename inside it survives a power cut (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(path):
    """Delete the ``.NAME.*.tmp`` files beside ``path`` that writes killed midway left; return them.

    Call it only where one process writes ``path`` at a time (a run's own files): there,
    any such file is stale."""
    path = Path(path)
    stale = [candidate for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
             if is_regular_file(candidate)]
    for candidate in stale:
        candidate.unlink(missing_ok=True)
    return stale


def is_regular_file(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)  # lstat: a link is not followed, nor removed
    except OSError:
        return False


def print_to_a_reader(text, write=print):
    """``write(text)``, then flush: where standard output cannot take it (its reader went away, ``mnn train |
    head``; a full disk; closed), what follows is printed nowhere, and the work goes on (a pipe that breaks
    raises at the flush, and at the exit, not at the write, where output is buffered)."""
    try:
        write(text)
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        silence_stdout()


def silence_stdout():
    """Send what is printed from now on nowhere: the reader of standard output went away."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(OSError, ValueError):  # a closed or replaced stream has no descriptor to point
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class Progress:
    """Standard error as the progress bars write to it, going quiet, never raising, where it cannot take
    more (its reader went away, ``mnn train 2>&1 | head``; closed; a full disk): a bar is no reason to stop
    the work it shows, nor to lose what was trained since the last checkpoint."""

    def __init__(self):
        self.stream = sys.stderr

    def write(self, text):
        self.call("write", text)
        return len(text)

    def flush(self):
        self.call("flush")

    def call(self, method, *arguments):
        if self.stream is None:
            return
        try:
            getattr(self.stream, method)(*arguments)
        except (OSError, ValueError):  # ValueError: a closed file
            self.stream = None

    def fileno(self):  # tqdm asks for the terminal's width
        if self.stream is None:
            raise OSError("progress output is closed")
        return self.stream.fileno()

    def isatty(self):
        return self.stream is not None and self.stream.isatty()

    @property
    def encoding(self):  # tqdm draws its bar in Unicode where the stream takes it
        return getattr(self.stream, "encoding", None)

    def __eq__(self, other):  # tqdm clears the bar before a message only where its stream is sys.stderr
        return other is self or (self.stream is not None and other is self.stream)

    __hash__ = object.__hash__  # one object, however it compares


def tell(text):
    """Write ``text`` to standard error straight to its descriptor (safe in a signal handler, where print()
    may be halfway through a write), saying nothing where standard error is gone."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (a pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of(mode):
    """What a file that is no regular file is ('a FIFO (a pipe)', ...), from its ``st_mode``."""
    return next((name for test, name in FILE_KINDS if test(mode)), "not a plain file")


def quoted(path):
    """``path`` as a shell takes it back, for a command printed to be pasted: quoted where it must be."""
    return shlex.quote(str(path))


def counted(count, noun):
    """'1 evaluation', '3 evaluations': a count and its noun, for messages."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def one_line(error):
    """An exception's message on one line (a library's may span several), for errors naming a file."""
    return " ".join(str(error).split()) or type(error).__name__


def numpy_format(path):
    """'npy' or 'npz' as the file's first bytes say, else None. ``numpy.load`` decides by them too, and
    takes anything else for a pickle, which mnn never loads: its error would then speak of pickles."""
    with open(path, "rb") as handle:
        start = handle.read(6)
    return "npy" if start == b"\x93NUMPY" else "npz" if start[:4] in (b"PK\x03\x04", b"PK\x05\x06") else None
