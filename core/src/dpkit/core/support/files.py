"""File operations that never follow, truncate or delete what someone else planted.

dpkit writes into directories other programs share: the kubelet's plugin_dir (every device
plugin of the node), the CDI and NFD directories, and a state_dir that may be a shared tmpfs. So:

* files are created under unpredictable names with ``O_CREAT|O_EXCL|O_NOFOLLOW`` relative to a
  directory fd, then renamed into place (a planted link or file at the temporary name is never
  opened);
* cleanup removes only entries dpkit made itself: unix sockets (``S_ISSOCK``) owned by our
  effective uid, checked with ``lstat``; it never follows a link and never recurses;
* an existing directory is never re-permissioned: when state_dir can be written by others,
  dpkit makes and uses its own private subdirectory.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dpkit.core.support.logs import get_logger, kv

log = get_logger("files")

STAGING_PREFIX = ".dpkit-bind-"  # private directories sockets are bound in before being renamed into place
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never a torn one.

    The temporary name is hidden (leading dot, no ``.json``) so neither the CDI cache nor NFD's
    local source picks it up half-written, and random so nobody can plant a link or a hard link
    there in advance; it is created with ``O_EXCL|O_NOFOLLOW`` in the directory held open by fd,
    and renamed within that same directory.
    """
    directory = os.open(path.parent, _DIR_FLAGS)
    try:
        tmp = f".{path.name}.{os.urandom(8).hex()}.tmp"  # what secrets.token_hex does, without loading hashlib
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fchmod(handle.fileno(), mode)  # the umask must not make it unreadable for the runtime
                os.fsync(handle.fileno())
            os.replace(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=directory)
            except FileNotFoundError:
                pass
            raise
    finally:
        os.close(directory)


def _make_private_dir(parent: Path, prefix: str, attempts: int = 100) -> Path:
    """A new 0700 directory ``<prefix><random>`` in ``parent``, created exclusively; its absolute path.

    What ``tempfile.mkdtemp`` guarantees, without importing tempfile (and random, shutil, bz2, lzma)
    into the serving process. A name someone planted first is skipped, never reused.
    """
    for _ in range(attempts):
        path = os.path.abspath(os.path.join(parent, f"{prefix}{os.urandom(8).hex()}"))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return Path(path)
    raise FileExistsError(errno.EEXIST, f"no free name for a private directory after {attempts} tries",
                          os.path.join(parent, prefix))


def remove_quietly(path: Path, logger: logging.Logger | None = None) -> None:
    """Remove a file we wrote; a failure is logged, never raised (shutdown must go on).

    ``unlink`` removes a link itself, never its target.
    """
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        (logger or log).warning("cannot remove file", extra=kv(file=str(path), error=exc.strerror or str(exc)))


def _own(st: os.stat_result, kind: Callable[[int], bool]) -> bool:
    return kind(st.st_mode) and st.st_uid == os.geteuid()


def remove_own_socket(name: str | Path, dir_fd: int | None = None) -> bool:
    """Unlink ``name`` only if it is a unix socket owned by us (``lstat``); True when removed."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not _own(st, stat.S_ISSOCK):
            return False
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def own_sockets(directory: Path, prefix: str, suffix: str) -> list[Path]:
    """Entries ``<prefix>*<suffix>`` of ``directory`` that are unix sockets owned by us (links not followed)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
                continue
            try:
                if _own(entry.stat(follow_symlinks=False), stat.S_ISSOCK):
                    found.append(directory / entry.name)
            except FileNotFoundError:
                continue
    return found


def remove_staging_dirs(directory: Path, is_stale: Callable[[Path], bool], prefix: str = STAGING_PREFIX) -> None:
    """Remove the bind directories a killed run left in ``directory``.

    Only real directories owned by us count (never a link, a file or someone else's directory);
    inside them only our own sockets that ``is_stale`` (nobody listening: a concurrent start of
    another dpkit may be binding right now) are removed, then the directory if that left it
    empty. Anything else is left where it is, with a log line.
    """
    parent = os.open(directory, _DIR_FLAGS)
    try:
        with os.scandir(parent) as entries:
            names = [e.name for e in entries if e.name.startswith(prefix)]
        for name in names:
            _remove_staging_dir(directory, parent, name, is_stale)
    finally:
        os.close(parent)


def _remove_staging_dir(directory: Path, parent: int, name: str, is_stale: Callable[[Path], bool]) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not _own(st, stat.S_ISDIR):
            log.warning("leaving alone an entry with dpkit's bind-directory name that dpkit did not make",
                        extra=kv(path=str(directory / name), uid=st.st_uid, type=stat.filemode(st.st_mode)[0]))
            return
        inner = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        try:
            if os.fstat(inner).st_ino != st.st_ino:
                return  # swapped under us: not ours to judge
            with os.scandir(inner) as entries:
                children = [e.name for e in entries]
            for child in children:
                if is_stale(directory / name / child):
                    remove_own_socket(child, dir_fd=inner)
        finally:
            os.close(inner)
        os.rmdir(name, dir_fd=parent)
    except OSError as exc:  # not empty, gone, or not ours: never a reason not to start
        if not isinstance(exc, FileNotFoundError):
            log.info("leftover bind directory kept", extra=kv(path=str(directory / name),
                                                               error=exc.strerror or str(exc)))


@contextmanager
def staging_dir(parent: Path, prefix: str = STAGING_PREFIX) -> Iterator[Path]:
    """A fresh private (0700, random name, created exclusively) directory to bind a socket in.

    On exit our own sockets left inside (a failed start) are removed, then the directory.
    """
    private = _make_private_dir(parent, prefix)
    try:
        yield private
    finally:
        try:
            fd = os.open(private, _DIR_FLAGS | os.O_NOFOLLOW)
            try:
                for child in os.listdir(fd):
                    remove_own_socket(child, dir_fd=fd)
            finally:
                os.close(fd)
            private.rmdir()
        except OSError as exc:
            log.warning("cannot remove bind directory", extra=kv(path=str(private), error=exc.strerror or str(exc)))


# -- state_dir ---------------------------------------------------------------------------------
def _writable_only_by_us(st: os.stat_result) -> bool:
    return _own(st, stat.S_ISDIR) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private(st: os.stat_result) -> bool:
    return _own(st, stat.S_ISDIR) and not st.st_mode & 0o077


def private_state_dir(state_dir: str | Path, create: bool = True) -> Path:
    """The directory holding dpkit's control and event sockets for ``state_dir``.

    * missing: created with mode 0700 and used;
    * a directory of ours nobody else can write: used as it is (its mode is not touched);
    * anything else (a shared 1777 tmpfs, an emptyDir, someone else's directory): dpkit's own
      0700 subdirectory ``dpkit-<uid>``; if another user planted that name first, the first
      ``dpkit-<uid>.*`` directory of ours, or a new one with a random suffix.

    ``create=False`` (the ``dpkit status`` client) computes the same answer without creating
    anything. Only processes of our uid can make a directory the rules accept, so both sides
    agree.
    """
    base = Path(state_dir)
    try:
        st = os.stat(base)  # the configured path itself may be a link the operator chose
    except FileNotFoundError:
        if not create:
            return base
        base.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        st = os.stat(base)
    if _writable_only_by_us(st):
        return base
    euid = os.geteuid()
    first = base / f"dpkit-{euid}"
    for candidate in [first, *sorted(base.glob(f"dpkit-{euid}.*"))]:
        try:
            if _private(os.stat(candidate, follow_symlinks=False)):
                return candidate
        except FileNotFoundError:
            continue
    if not create:
        return first
    try:
        os.mkdir(first, 0o700)
        return first
    except FileExistsError:
        log.warning("state_dir subdirectory name taken by something dpkit did not make; using a new one",
                    extra=kv(path=str(first)))
        return _make_private_dir(base, f"dpkit-{euid}.")


# -- retries -----------------------------------------------------------------------------------
class RetryTimer:
    """Runs ``action`` on its own thread after 1 s, 2 s, 4 s ... (at most ``longest``) until it succeeds.

    For writes that failed for a reason outside dpkit (full or read-only disk): they must be
    redone when the cause clears, not only at the next device change. ``arm`` starts the
    retries (idempotent); ``action`` returns True when nothing is left to retry. The thread starts on the first ``arm``.
    """

    def __init__(self, action: Callable[[], bool], name: str, first: float = 1.0, longest: float = 60.0) -> None:
        self._action = action
        self._name = name
        self._first = first
        self._longest = longest
        self._cond = threading.Condition()
        self._due: float | None = None  # monotonic time of the next attempt; None when idle
        self._delay = first
        self._closed = False
        self._thread: threading.Thread | None = None
        self.attempts = 0

    def arm(self) -> None:
        with self._cond:
            if self._closed or self._due is not None:
                return
            if self.attempts == 0:
                self._delay = self._first
            self._due = time.monotonic() + self._delay
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def next_in(self) -> float | None:
        """Seconds until the next attempt (None when nothing is pending)."""
        with self._cond:
            return None if self._due is None else round(max(0.0, self._due - time.monotonic()), 1)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._due = None
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._due is None or self._due > time.monotonic()):
                    self._cond.wait(None if self._due is None else self._due - time.monotonic())
                if self._closed:
                    return
                self._due = None  # an arm() while the action runs schedules afresh
                self.attempts += 1
            try:
                done = self._action()
            except Exception:
                log.exception("retry failed", extra=kv(task=self._name))
                done = False
            with self._cond:
                if done and self._due is None:
                    self.attempts = 0
                elif not done and self._due is None and not self._closed:
                    self._delay = min(self._delay * 2, self._longest)
                    self._due = time.monotonic() + self._delay
