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
    """A vendor refuses an allocation request (e.g. too many shared replicas for one container).

    Raised from ``container_spec``; the message reaches the kubelet exactly as written, with the
    gRPC code a Go plugin's plain error gets (UNKNOWN), so an operator migrating from an
    upstream plugin sees the same pod event text.
    """
