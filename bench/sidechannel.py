"""A tiny command channel into a benchmarked server process: one JSON object per line over a unix socket.

The benchmarks need to make a server report a health change at a moment they choose and to learn
when a burst ended, without going through the API under test. Both the bare grpcio floor and the
dpkit bench vendor serve this channel, so the measuring client drives them the same way.
Times in replies are ``time.monotonic()`` (CLOCK_MONOTONIC), comparable across processes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def device_ids(count: int) -> list[str]:
    """The device IDs every benchmarked server uses, so one command means the same device everywhere."""
    return [f"dev-{i:06d}" for i in range(count)]


def serve(path: str | Path, handler: Handler, stop: threading.Event) -> None:
    """Answer commands on ``path`` until ``stop`` is set; one client at a time, one reply per line.

    Polls ``stop`` every 0.2 s so the caller's thread ends when the server shuts down.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.2)
    try:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                _session(conn, handler, stop)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _session(conn: socket.socket, handler: Handler, stop: threading.Event) -> None:
    buffer = b""
    while not stop.is_set():
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                reply = handler(json.loads(line))
            except Exception as exc:  # a bad command must not end the benchmarked server
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")


class Client:
    """The measuring side: a persistent connection, so a command costs no connect."""

    def __init__(self, path: str | Path, timeout: float = 120.0, connect_within: float = 30.0) -> None:
        # The server binds before it listens, and a loaded machine may leave a gap between the two
        # (ECONNREFUSED on a path that exists): retry until it listens, within a deadline.
        deadline = time.monotonic() + connect_within
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(path))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self.reader = self.sock.makefile("rb")

    def send(self, command: dict[str, Any]) -> None:
        """Send without waiting for the reply (collect it later with :meth:`reply`)."""
        self.sock.sendall(json.dumps(command).encode() + b"\n")

    def reply(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("side channel closed")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"side channel command failed: {answer.get('error')}")
        return answer

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
