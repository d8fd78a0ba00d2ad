"""Checked downloads from a local HTTP server: an overall deadline, mirrors, nothing left behind."""
import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mnn.data import ChecksumError, DownloadTimeout, download, download_from_mirrors

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
GOOD = hashlib.sha256(PAYLOAD).hexdigest()
TRICKLE_INTERVAL = 0.05  # seconds between the bytes of /slow/
STALL_LIMIT = 5.0  # seconds /stall/ waits (or until the test ends)


class Handler(BaseHTTPRequestHandler):
    """The first path segment says how to answer: good, bad (other bytes), slow (one byte at a time),
    stall (headers, then nothing), short (half, then hang up), nolength (the bytes under a
    Content-Length that is no number), loop (a redirect to itself), broken (a redirect to a URL
    that cannot be parsed); anything else is a 404."""

    def do_GET(self):
        kind = self.path.strip("/").split("/")[0]
        if kind in ("loop", "broken"):
            self.send_response(302)
            self.send_header("Location", self.path if kind == "loop" else "http://[::1/file.bin")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if kind not in ("good", "bad", "slow", "stall", "short", "nolength"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", "many" if kind == "nolength" else str(len(PAYLOAD)))
        self.end_headers()
        try:
            getattr(self, kind)()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            pass

    def good(self):
        self.wfile.write(PAYLOAD)

    def nolength(self):
        self.wfile.write(PAYLOAD)
        self.close_connection = True

    def bad(self):
        self.wfile.write(PAYLOAD[::-1])

    def slow(self):
        for index in range(len(PAYLOAD)):
            if self.server.stopping.wait(TRICKLE_INTERVAL):
                return
            self.wfile.write(PAYLOAD[index:index + 1])
            self.wfile.flush()

    def stall(self):
        self.wfile.flush()
        self.server.stopping.wait(STALL_LIMIT)

    def short(self):
        self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """The URL of a local HTTP server in a thread, stopped (with its slow answers) when the test ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.stopping = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def only_files(folder):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_download_shows_progress_and_keeps_the_file(server, tmp_path, capsys):
    assert download(f"{server}/good/file.bin", tmp_path / "file.bin", GOOD).read_bytes() == PAYLOAD
    assert "download file.bin" in capsys.readouterr().err
    assert only_files(tmp_path) == ["file.bin"]


def test_a_server_that_trickles_bytes_meets_the_overall_deadline(server, tmp_path):
    """Each byte comes well within the read timeout, so only the deadline stops it (it used to hang)."""
    started = time.monotonic()
    with pytest.raises(DownloadTimeout, match=r"/slow/file.bin: download unfinished after 0.5 s \(\d+ bytes"):
        download(f"{server}/slow/file.bin", tmp_path / "file.bin", GOOD, deadline=0.5, read_timeout=2)
    assert time.monotonic() - started < 3
    assert only_files(tmp_path) == [], "no partial file, no temporary file"


def test_a_server_that_stalls_meets_the_read_timeout(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        download(f"{server}/stall/file.bin", tmp_path / "file.bin", GOOD, deadline=60, read_timeout=0.3)
    assert time.monotonic() - started < 3
    assert only_files(tmp_path) == []


def test_a_mirror_with_other_bytes_is_passed_over_for_the_next(server, tmp_path):
    """A checksum mismatch on the first mirror used to stop the search."""
    mirrors = [f"{server}/bad/", f"{server}/good/"]
    path = download_from_mirrors(mirrors, "file.bin", tmp_path / "file.bin", GOOD)
    assert path.read_bytes() == PAYLOAD and only_files(tmp_path) == ["file.bin"]


def test_when_every_mirror_fails_the_error_says_what_each_did(server, tmp_path):
    mirrors = [f"{server}/bad/", f"{server}/missing/", f"{server}/short/", f"{server}/slow/"]
    with pytest.raises(ConnectionError) as caught:
        download_from_mirrors(mirrors, "file.bin", tmp_path / "file.bin", GOOD, deadline=0.3, read_timeout=2,
                              quiet=True)
    message = str(caught.value)
    assert message.startswith("file.bin could not be downloaded from any mirror") and "\n" not in message
    assert f"{server}/bad/file.bin: sha256" in message and "does not match" in message
    assert f"{server}/missing/file.bin: HTTP Error 404" in message
    assert f"{server}/short/file.bin: the server sent 8192 of 16384 bytes" in message
    assert f"{server}/slow/file.bin: download unfinished after 0.3 s" in message
    assert only_files(tmp_path) == []


def test_a_failed_download_keeps_the_previous_file(server, tmp_path):
    (tmp_path / "file.bin").write_bytes(b"previous")
    with pytest.raises(ChecksumError):
        download(f"{server}/bad/file.bin", tmp_path / "file.bin", GOOD)
    assert (tmp_path / "file.bin").read_bytes() == b"previous" and only_files(tmp_path) == ["file.bin"]


def test_a_length_that_is_no_number_is_no_length(server, tmp_path):
    assert download(f"{server}/nolength/file.bin", tmp_path / "file.bin", GOOD, quiet=True).read_bytes() == PAYLOAD


def test_a_redirect_loop_or_a_broken_redirect_passes_to_the_next_mirror_in_one_line(server, tmp_path):
    mirrors = [f"{server}/loop/", f"{server}/broken/", f"{server}/good/"]
    assert download_from_mirrors(mirrors, "file.bin", tmp_path / "file.bin", GOOD, quiet=True).read_bytes() == PAYLOAD
    with pytest.raises(ConnectionError) as caught:
        download_from_mirrors(mirrors[:2], "file.bin", tmp_path / "other.bin", GOOD, quiet=True)
    message = str(caught.value)
    assert "\n" not in message and f"{server}/loop/file.bin: HTTP Error 302" in message
    assert f"{server}/broken/file.bin: bad answer from the server" in message and "IPv6" in message
    assert only_files(tmp_path) == ["file.bin"]
