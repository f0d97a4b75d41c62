"""DirWatch against the real kernel: events for what the kubelet link reacts to, in a temp dir."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpkit.core.support import dirwatch
from dpkit.core.support.dirwatch import DirWatch

ALL = (dirwatch.CREATE | dirwatch.DELETE | dirwatch.MOVED_TO | dirwatch.MOVED_FROM | dirwatch.DELETE_SELF
       | dirwatch.MOVE_SELF | dirwatch.ATTRIB)


@pytest.fixture
def watch() -> Iterator[DirWatch]:
    with DirWatch() as w:
        yield w


def events(watch: DirWatch, want: int, timeout: float = 5.0) -> int:
    """OR of the masks read until every bit of ``want`` was seen (or the timeout passes)."""
    seen = 0
    while seen & want != want:
        readable, _, _ = select.select([watch], [], [], timeout)
        if not readable:
            break
        for mask in watch.read():
            seen |= mask
    return seen


def test_create_delete_and_rename_of_a_file(tmp_path: Path, watch: DirWatch) -> None:
    watch.add_watch(tmp_path, ALL)
    (tmp_path / "a").write_text("x")
    assert events(watch, dirwatch.CREATE) & dirwatch.CREATE
    (tmp_path / "a").rename(tmp_path / "b")
    assert events(watch, dirwatch.MOVED_FROM | dirwatch.MOVED_TO) & (dirwatch.MOVED_FROM | dirwatch.MOVED_TO) == (
        dirwatch.MOVED_FROM | dirwatch.MOVED_TO)
    (tmp_path / "b").unlink()
    assert events(watch, dirwatch.DELETE) & dirwatch.DELETE


def test_create_delete_and_rename_of_a_unix_socket(short_tmp: Path, watch: DirWatch) -> None:
    watch.add_watch(short_tmp, ALL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(short_tmp / "kubelet.sock"))
    assert events(watch, dirwatch.CREATE) & dirwatch.CREATE
    os.rename(short_tmp / "kubelet.sock", short_tmp / "moved.sock")
    both = dirwatch.MOVED_FROM | dirwatch.MOVED_TO
    assert events(watch, both) & both == both
    (short_tmp / "moved.sock").unlink()
    assert events(watch, dirwatch.DELETE) & dirwatch.DELETE


def test_deleting_the_watched_directory_ends_the_watch(tmp_path: Path, watch: DirWatch) -> None:
    watched = tmp_path / "plugins"
    watched.mkdir()
    watch.add_watch(watched, ALL)
    watched.rmdir()
    gone = dirwatch.DELETE_SELF | dirwatch.IGNORED
    assert events(watch, gone) & gone == gone


def test_read_with_nothing_pending_returns_at_once(tmp_path: Path, watch: DirWatch) -> None:
    watch.add_watch(tmp_path, ALL)
    assert watch.read() == []
    (tmp_path / "a").write_text("x")
    assert events(watch, dirwatch.CREATE)
    assert watch.read() == []  # drained: empty again, not blocking


def test_a_read_takes_at_most_one_buffer(tmp_path: Path, watch: DirWatch) -> None:
    """Many queued events come out over several reads; none is lost or torn between them."""
    watch.add_watch(tmp_path, dirwatch.CREATE)
    name = "n" * 200  # each event then takes 16 + 208 bytes: 2000 of them are more than one buffer
    for i in range(2000):
        (tmp_path / f"{name}{i:04}").touch()
    reads = []
    while batch := watch.read():
        reads.append(batch)
    assert len(reads) > 1
    assert all(mask == dirwatch.CREATE for batch in reads for mask in batch)
    assert sum(map(len, reads)) == 2000


def test_close_is_idempotent_and_releases_the_descriptor(tmp_path: Path) -> None:
    watch = DirWatch()
    fd = watch.fileno()
    watch.close()
    watch.close()
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        watch.fileno()


def test_the_descriptor_is_non_blocking_and_close_on_exec(watch: DirWatch) -> None:
    assert not os.get_blocking(watch.fileno())
    assert not os.get_inheritable(watch.fileno())


def test_a_missing_path_raises_enoent(tmp_path: Path, watch: DirWatch) -> None:
    with pytest.raises(OSError) as err:
        watch.add_watch(tmp_path / "missing", ALL)
    assert err.value.errno == errno.ENOENT
    assert err.value.filename == str(tmp_path / "missing")


def test_loading_it_imports_neither_ctypes_util_nor_its_stdlib_chain() -> None:
    from child_process import loaded_after

    code = "import dpkit.core.support.dirwatch as d; w = d.DirWatch(); w.close()"
    assert loaded_after(code, ("ctypes.util", "shutil", "tempfile", "subprocess", "termios")) == []
