"""A Linux inotify watch, through libc's own symbols: what the kubelet link needs and no more.

Not ``inotify_simple``: it finds libc with ``ctypes.util.find_library``, and ``ctypes.util``
imports shutil (bz2, lzma, fnmatch), subprocess, tempfile (random, hashing) and termios; about
0.5 MB resident in every serving process for one lookup. ``ctypes.CDLL(None)`` opens the libc
the interpreter is already linked against, so nothing else is loaded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from types import TracebackType

# inotify event bits (<sys/inotify.h>)
ATTRIB = 0x00000004
MOVED_FROM = 0x00000040
MOVED_TO = 0x00000080
CREATE = 0x00000100
DELETE = 0x00000200
DELETE_SELF = 0x00000400
MOVE_SELF = 0x00000800
Q_OVERFLOW = 0x00004000  # the kernel queue overflowed: events were lost
IGNORED = 0x00008000  # the watch is gone (its directory was deleted or unmounted)

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
BUFFER = 65536  # at most this much is read per call; the rest stays queued and the fd stays readable


class DirWatch:
    """One non-blocking inotify instance: select on :meth:`fileno`, then :meth:`read` the event masks."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            self._init1 = libc.inotify_init1
            self._add = libc.inotify_add_watch
        except AttributeError as exc:  # not Linux
            raise OSError(errno.ENOSYS, "inotify is not available") from exc
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._fd = self._check(self._init1(os.O_NONBLOCK | os.O_CLOEXEC), None)

    @staticmethod
    def _check(result: int, path: str | None) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return result

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("inotify watch is closed")
        return self._fd

    def add_watch(self, path: str | os.PathLike[str], mask: int) -> int:
        """Watch ``path`` for ``mask``; returns the watch descriptor. OSError (with errno) on failure."""
        return self._check(self._add(self.fileno(), os.fsencode(path), mask), os.fspath(path))

    def read(self) -> list[int]:
        """The masks of the events queued now, oldest first; empty when none (never blocks)."""
        try:
            data = os.read(self.fileno(), BUFFER)
        except BlockingIOError:
            return []
        masks = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, name_len = _EVENT.unpack_from(data, offset)
            masks.append(mask)
            offset += _EVENT.size + name_len
        return masks

    def close(self) -> None:
        """Close the inotify descriptor (and with it every watch). Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
