"""Link state changes from rtnetlink: the kernel sends no uevent when carrier or operstate change.

A ``NETLINK_ROUTE`` socket subscribed to ``RTMGRP_LINK`` gets an ``RTM_NEWLINK`` message for
every change of a link's flags, carrier or operstate in the socket's network namespace. Only
the link's name and kind are read from it; the facts still come from sysfs, so a message is
just a reason to re-discover.

Software links (veth pairs and bridges of every pod, dummy, vlan, macvlan...) carry their kind
in ``IFLA_LINKINFO``/``IFLA_INFO_KIND``; hardware netdevs such as ``sfc``'s have none. Messages
about software links are dropped so pod churn causes no work. Bridge-port notifications
(``ifi_family`` ``AF_BRIDGE``, also sent to the link group) are dropped as well.

Parsing never raises: a truncated or malformed message is skipped.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Collection
from dataclasses import dataclass

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_RECV_SIZE = 65536
_MAX_RECVS = 256  # per drain: a flood cannot keep the watch loop from discovering


@dataclass(frozen=True)
class LinkMessage:
    action: str  # "newlink" or "dellink"
    index: int
    name: str  # "" when absent or not text
    kind: str | None  # IFLA_INFO_KIND ("veth", "bridge"...); None for hardware netdevs


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    pos = start
    while pos + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size or pos + length > end:
            break
        attrs.setdefault(kind & _NLA_TYPE_MASK, data[pos + _RTATTR.size:pos + length])
        pos += _align(length)
    return attrs


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("ascii", "replace")[:64]


def parse(data: bytes) -> list[LinkMessage]:
    """The link messages in one datagram (several netlink messages may share one)."""
    messages: list[LinkMessage] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body, end = offset + _NLMSGHDR.size, offset + length
        offset += _align(length)
        if kind not in (RTM_NEWLINK, RTM_DELLINK) or body + _IFINFOMSG.size > end:
            continue
        family, _, index, _, _ = _IFINFOMSG.unpack_from(data, body)
        if family != socket.AF_UNSPEC:  # AF_BRIDGE port notifications and the like
            continue
        attrs = _attributes(data, body + _IFINFOMSG.size, end)
        link_kind = None
        if IFLA_LINKINFO in attrs:
            info = attrs[IFLA_LINKINFO]
            nested = _attributes(info, 0, len(info))
            if IFLA_INFO_KIND in nested:
                link_kind = _text(nested[IFLA_INFO_KIND])
        messages.append(LinkMessage("newlink" if kind == RTM_NEWLINK else "dellink", index,
                                    _text(attrs.get(IFLA_IFNAME, b"")), link_kind))
    return messages


class LinkMonitor:
    """A non-blocking rtnetlink socket on the link group; raises ``OSError`` when refused.

    ``accept_kinds``: software link kinds that count anyway (tests use a dummy or veth link).
    """

    def __init__(self, accept_kinds: Collection[str] = ()) -> None:
        self.accept_kinds = frozenset(accept_kinds)
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
