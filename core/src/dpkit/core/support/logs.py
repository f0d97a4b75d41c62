"""Structured logging: human lines by default, one JSON object per line with ``--log-json``.

Call sites pass context as ``extra={"fields": {...}}`` (or use :func:`kv`) so both formats
carry the same facts: resource, device, reason.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

LOGGER_NAME = "dpkit"


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def kv(**fields: Any) -> dict[str, Mapping[str, Any]]:
    """``log.info("msg", extra=kv(resource=r))``: structured fields for either format."""
    return {"fields": fields}


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    value = getattr(record, "fields", None)
    return value if isinstance(value, Mapping) else {}


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extra:
            line += f" [{extra}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in _fields(record).items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced, e.g. by test capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(fmt: str = "human", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure the ``dpkit`` logger tree once, for the CLI."""
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger(LOGGER_NAME)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class RateLimiter:
    """Lets through at most ``burst`` log lines per ``interval`` seconds and counts the rest.

    Used where a peer controls how often we would log (garbage on the event socket): the log
    must show the problem, not grow with the attacker's rate. Callers log :meth:`suppressed`
    with the next line that passes, so nothing is hidden, only summarised.
    """

    def __init__(self, burst: int = 10, interval: float = 60.0, clock: Any = time.monotonic) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._window_start = -float("inf")
        self._passed = 0
        self._dropped = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._passed = 0
        if self._passed < self.burst:
            self._passed += 1
            return True
        self._dropped += 1
        return False

    def suppressed(self) -> int:
        """Lines dropped since the last call (reset on read)."""
        dropped, self._dropped = self._dropped, 0
        return dropped
