"""Text corpora: the Tiny Shakespeare shipped in the package, bad text files, and texts too short to train on."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mnn.data.text as text
from mnn import text_task
from mnn.data import ChecksumError
from mnn.data.text import load_text, locate_text
from mnn.train import TrainConfig

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_shipped_check():
    """Forget that the shipped copy was checked, before and after the test."""
    text.shipped_text.cache_clear()
    yield
    text.shipped_text.cache_clear()


def test_no_path_means_the_shipped_copy_offline_checked_once(tmp_path, monkeypatch, fresh_shipped_check):
    def no_network(*args, **kwargs):
        raise AssertionError("the shipped copy needs no download")

    checked = []
    monkeypatch.setattr(text, "download", no_network)
    monkeypatch.setattr(text, "file_digest", lambda path: checked.append(path) or text.TINY_SHAKESPEARE_SHA256)
    monkeypatch.setenv("MNN_CACHE", str(tmp_path / "empty-cache"))
    first, second = load_text(), load_text()
    assert first == second and len(first) == 1115394 and first.startswith("First Citizen:")
    assert checked == [text.SHIPPED_TEXT], "its sha256 is computed once per process"


def test_the_shipped_copy_is_the_published_tiny_shakespeare(fresh_shipped_check):
    assert locate_text() == text.SHIPPED_TEXT
    assert text.file_digest(text.SHIPPED_TEXT) == text.TINY_SHAKESPEARE_SHA256


def test_a_damaged_shipped_copy_is_an_error(tmp_path, monkeypatch, fresh_shipped_check):
    damaged = tmp_path / "tinyshakespeare.txt"
    damaged.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    monkeypatch.setattr(text, "SHIPPED_TEXT", damaged)
    with pytest.raises(ChecksumError, match=r"comes with mnn is damaged .*tinyshakespeare.txt: sha256 .*--data-dir"):
        load_text()
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match=r"comes with mnn is missing .*reinstall mnn"):
        load_text()


def test_a_text_downloaded_from_a_url_needs_its_sha256(tmp_path):
    with pytest.raises(ValueError, match=r"downloaded from .* needs its sha256"):
        locate_text(url=(tmp_path / "corpus.txt").as_uri())


def test_the_wheel_ships_tinyshakespeare(tmp_path):
    """A regular (not editable) install has the text: it is package data in pyproject.toml."""
    pytest.importorskip("setuptools", minversion="77", reason="pyproject.toml needs setuptools >= 77 to build")
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY / "src" / "mnn", source / "src" / "mnn",
                    ignore=shutil.ignore_patterns("__pycache__"))  # no stale egg-info that could list it anyway
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "wheel").glob("mnn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.getinfo("mnn/data/tinyshakespeare.txt").file_size == 1115394


def test_an_empty_text_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        load_text(tmp_path / "empty.txt")


def test_a_byte_order_mark_is_not_a_character_of_the_text(tmp_path):
    path = tmp_path / "marked.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert text.read_text(path) == "hello\n"
    path.write_bytes(b"\xef\xbb\xbfabc\xe9")
    with pytest.raises(ValueError, match=r"marked.txt is not UTF-8 text: byte 0xe9 at offset 6"):
        text.read_text(path)


def test_windows_and_old_mac_line_endings_are_newlines(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"ROMEO:\r\nO, she doth teach\r\rthe torches\n")
    assert text.read_text(path) == "ROMEO:\nO, she doth teach\n\nthe torches\n"  # no CR for a model to learn


def test_a_text_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("To be, or not to be: café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 24"):
        load_text(tmp_path / "latin1.txt")


def test_a_folder_without_a_text_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no text at .*tinyshakespeare.txt, .*input.txt"):
        load_text(tmp_path)


def text_task_on(path, context=64, limit=0):
    return text_task.TextTask(TrainConfig(model="gpt", dataset="tinyshakespeare", data_dir=str(path), batch_size=4,
                                          limit=limit, model_kwargs={"context": context}))


def write_text(path, characters):
    path.write_text(("abcdefghij\n" * (characters // 11 + 1))[:characters])
    return path


def test_a_text_whose_validation_split_is_shorter_than_a_window_is_an_error(tmp_path):
    """500 characters with context 64: 50 for validation, which used to divide by zero."""
    with pytest.raises(ValueError, match=r"short.txt: its validation split has 50 characters \(of 500\), fewer than "
                                         r"context \+ 1 = 65; give a longer text or a smaller --context"):
        text_task_on(write_text(tmp_path / "short.txt", 500))


def test_a_text_whose_training_split_is_shorter_than_a_window_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"training split has 45 characters \(of 50\), fewer than context \+ 1 = 65"):
        text_task_on(write_text(tmp_path / "tiny.txt", 50))
    with pytest.raises(ValueError, match=r"its training split has 10 characters after --limit \(of 2000\)"):
        text_task_on(write_text(tmp_path / "text.txt", 2000), context=16, limit=10)


def test_a_text_just_long_enough_trains_and_validates(tmp_path):
    task = text_task_on(write_text(tmp_path / "enough.txt", 90), context=8)  # 81 for training, 9 for validation
    assert len(task.train) == 81 and len(task.val) == 9
    x, y = task.batch(0)
    assert x.shape == y.shape == (4, 8)


def test_an_empty_text_file_is_an_error_for_the_task(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.txt is empty"):  # it used to say "high <= 0"
        text_task_on(tmp_path / "empty.txt")


@pytest.mark.parametrize("context", [0, -3, 2.5])
def test_a_context_that_is_not_a_positive_whole_number_is_an_error(tmp_path, context):
    with pytest.raises(ValueError, match=r"--context must be a whole number of characters, at least 1"):
        text_task_on(write_text(tmp_path / "text.txt", 1000), context=context)


def test_the_gpt_task_without_a_data_dir_trains_on_the_shipped_copy():
    task = text_task.TextTask(TrainConfig(model="gpt", dataset="tinyshakespeare", batch_size=4,
                                          model_kwargs={"context": 8}))
    assert len(task.tokenizer) == 65 and len(task.train) + len(task.val) == 1115394


def test_an_evaluation_asked_to_stop_is_abandoned(tmp_path):
    from test_gpt import small_gpt
    task = text_task_on(write_text(tmp_path / "text.txt", 1000), context=8)
    net = small_gpt()
    assert task.evaluate(net, stop=lambda: True) is None
    assert task.evaluate(net, stop=lambda: False) == task.evaluate(net)


@pytest.mark.parametrize("make", ["fifo", "process substitution"])
def test_a_text_that_is_a_pipe_is_refused_naming_it(tmp_path, make, capsys):
    """A FIFO was searched as a folder ("no text at FIFO/input.txt"), and <(cat text) became a path that does
    not exist (/proc/N/fd/pipe:[...]): either is told as the pipe it is."""
    import os

    from mnn import cli
    if make == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        read, write = os.pipe()  # what <(...) hands a command: /dev/fd/N
        path = f"/dev/fd/{read}"
    try:
        assert cli.main(["train", "--model", "gpt", "--data", str(path), "--steps", "1", "--quiet",
                         "--out", str(tmp_path / "run")]) == 2
    finally:
        if make != "fifo":
            os.close(read)
            os.close(write)
    assert f"{path}: a FIFO (a pipe), not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
