"""Link state changes from rtnetlink: the kernel sends no uevent when carrier or operstate change.

A ``NETLINK_ROUTE`` socket subscribed to ``RTMGRP_LINK`` gets an ``RTM_NEWLINK`` message for
every change of a link's flags, carrier or operstate in the socket's network namespace. Only
the link's name and kind are read from it; the facts still come from sysfs, so a message is
just a reason to re-discover.

pyroute2 decodes the messages. The socket itself stays a plain non-blocking one, so it sits in
the same ``select`` as the udev monitor and a kernel overrun (``ENOBUFS``) is seen as such.
pyroute2 is imported when the first monitor opens (or the first message is parsed), not on the
first link change, so the change that wakes the loop does not wait for the import; ``dpkit
discover`` and ``doctor`` never open the socket and do not pay it (docs/sfc.md has the figures).

Software links (veth pairs and bridges of every pod, dummy, vlan, macvlan...) carry their kind
in ``IFLA_LINKINFO``/``IFLA_INFO_KIND``; hardware netdevs such as ``sfc``'s have none. Messages
about software links are dropped so pod churn causes no work. Bridge-port notifications
(``ifi_family`` ``AF_BRIDGE``, also sent to the link group) are dropped as well.

Parsing never raises: a truncated or malformed message ends the datagram's decoding.
When the socket cannot be opened, :func:`open_link_monitor` says why (logged once per process)
and link changes are seen only by the periodic re-discovery.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from typing import Any

from dpkit.core import get_logger

log = get_logger("sfc.rtnl")
_warned = False

# kernel ABI numbers (linux/rtnetlink.h, linux/if_link.h); the tests build raw messages with them
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
_RECV_SIZE = 65536
_MAX_RECVS = 256  # per drain: a flood cannot keep the watch loop from discovering
_ACTIONS = {RTM_NEWLINK: "newlink", RTM_DELLINK: "dellink"}


@dataclass(frozen=True)
class LinkMessage:
    action: str  # "newlink" or "dellink"
    index: int
    name: str  # "" when absent
    kind: str | None  # IFLA_INFO_KIND ("veth", "bridge"...); None for hardware netdevs


def _text(value: Any) -> str:
    """An attribute as text: pyroute2 gives ``str``, or ``bytes`` when the value is not UTF-8."""
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode("ascii", "replace")
    return value[:64] if isinstance(value, str) else ""


def _link_message(message: Any) -> LinkMessage | None:
    header = message.get("header", {})
    action = _ACTIONS.get(header.get("type"))
    if action is None or header.get("error") is not None:
        return None
    if message.get("family") != socket.AF_UNSPEC:  # AF_BRIDGE port notifications and the like
        return None
    kind = message.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    index = message.get("index")
    return LinkMessage(action, index if isinstance(index, int) else 0, _text(message.get_attr("IFLA_IFNAME")),
                       None if kind is None else _text(kind))


@cache
def _marshal() -> Any:
    """pyroute2's rtnetlink decoder (the import is the expensive part; the decoder is stateless)."""
    from pyroute2.netlink.rtnl.marshal import MarshalRtnl  # type: ignore[import-untyped]

    return MarshalRtnl()


def parse(data: bytes) -> list[LinkMessage]:
    """The link messages in one datagram (several netlink messages may share one)."""
    messages: list[LinkMessage] = []
    try:
        for message in _marshal().parse(data):
            link = _link_message(message)
            if link is not None:
                messages.append(link)
    except Exception:  # a malformed datagram must not stop the watch loop; what decoded is kept
        pass
    return messages


class LinkMonitor:
    """A non-blocking rtnetlink socket on the link group; raises ``OSError`` when refused.

    ``accept_kinds``: software link kinds that count anyway (tests use a dummy or veth link).
    """

    def __init__(self, accept_kinds: Collection[str] = ()) -> None:
        self.accept_kinds = frozenset(accept_kinds)
        _marshal()
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                     socket.NETLINK_ROUTE)
        try:
            self._socket.bind((0, RTMGRP_LINK))
            self._socket.setblocking(False)
        except OSError:
            self._socket.close()
            raise

    def fileno(self) -> int:
        return self._socket.fileno()

    def relevant(self, message: LinkMessage) -> bool:
        return message.kind is None or message.kind in self.accept_kinds

    def drain(self) -> list[tuple[str, str, str]]:
        """Every relevant message waiting, as (action, "rtnetlink", interface name)."""
        events: list[tuple[str, str, str]] = []
        for _ in range(_MAX_RECVS):
            try:
                data = self._socket.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: assume one mattered
                    events.append(("overrun", "rtnetlink", ""))
                    continue
                raise
            if not data:
                break
            events += [(m.action, "rtnetlink", m.name) for m in parse(data) if self.relevant(m)]
        return events

    def close(self) -> None:
        self._socket.close()


def open_link_monitor(accept_kinds: Collection[str] = ()) -> tuple[LinkMonitor | None, str]:
    """A :class:`LinkMonitor`, or None and why not (logged once per process)."""
    global _warned
    try:
        return LinkMonitor(accept_kinds), ""
    except OSError as exc:
        reason = f"cannot open an rtnetlink socket ({exc})"
    except ImportError as exc:  # pyroute2 missing from a hand-built image
        reason = f"cannot decode rtnetlink without pyroute2 ({exc})"
    error = f"{reason}; link up/down is seen only by the periodic resync"
    if not _warned:
        _warned = True
        log.warning(error)
    return None, error
