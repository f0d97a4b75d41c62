"""Errors the core raises; library code raises these and the manager decides what to do."""

from __future__ import annotations


class DpkitError(Exception):
    """Base class for every error dpkit raises on purpose."""


class ValidationError(DpkitError, ValueError):
    """A value from hardware, config or a request failed a check."""


class ConfigError(DpkitError):
    """A configuration file or environment override is malformed; the message names where."""


class VendorError(DpkitError):
    """A vendor could not be loaded or failed in a way it reported itself."""


class AllocationError(DpkitError):
    """An Allocate request named devices that cannot be given out."""

    def __init__(self, message: str, *, unknown: tuple[str, ...] = (), unhealthy: tuple[str, ...] = ()):
        super().__init__(message)
        self.unknown = unknown
        self.unhealthy = unhealthy
