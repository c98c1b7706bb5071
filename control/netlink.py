"""Thin kernel I/O for routes: route lookups, our tagged routes, sysctl, change events.

Every route we install carries rtnetlink protocol number :data:`RT_PROTO`
(157, unused by iproute2's ``rt_protos``; ``ip route show proto 157`` lists
them), so a restarted agent finds, adopts or removes them and ``flannelette
cleanup`` removes exactly ours. All pyroute2 calls here are synchronous and
open one short-lived ``IPRoute`` per batch (about 1 ms): pyroute2's
``AsyncIPRoute`` does not run under uvloop and a synchronous ``IPRoute`` raises
inside a running loop, so async callers use the ``a*`` wrappers, which run the
batch in a worker thread with :func:`asyncio.to_thread`.

:class:`ChangeMonitor` is the exception: a raw, non-blocking rtnetlink socket
subscribed to link, IPv4 address and IPv4 route events, read with the event
loop's ``add_reader`` (works with uvloop too). It ignores route events carrying
our own protocol number, so applying a plan never wakes it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyNetlinkError

from control.errors import ControlError
from control.reconcile import OpKind, Route, RouteLookup, RouteOp

RT_PROTO = 157  # rtnetlink protocol of every route flannelette installs
MAIN_TABLE = 254
_RTN_LOCAL = 2
_RT_SCOPE_LINK = 253
_RT_SCOPE_NOWHERE = 255
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


class NetlinkError(ControlError):
    """The kernel refused a route operation or a query; the message names which."""


# ---- synchronous batches (run them in a worker thread) ----------------------------------------
@contextlib.contextmanager
def _session(what: str) -> Iterator[Any]:
    """One IPRoute for one batch; kernel and socket errors become :class:`NetlinkError`."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except (_PyNetlinkError, OSError) as e:
        raise NetlinkError(f"{what}: {e}") from e


def _names(ipr: Any) -> dict[int, str]:
    return {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.get_links()}


def route_get(addresses: Iterable[ipaddress.IPv4Address]
              ) -> dict[ipaddress.IPv4Address, tuple[RouteLookup, ...] | None]:
    """The kernel's route lookup for each address (``ip route get``); None where it failed."""
    out: dict[ipaddress.IPv4Address, tuple[RouteLookup, ...] | None] = {}
    with _session("route get") as ipr:
        names = _names(ipr)
        for addr in addresses:
            try:
                msgs = ipr.route("get", dst=str(addr))
            except _PyNetlinkError:
                out[addr] = None
                continue
            found = []
            for m in msgs:
                gw = m.get("RTA_GATEWAY")
                oif = m.get("RTA_OIF")
                found.append(RouteLookup(
                    ipaddress.IPv4Address(gw) if gw else None,
                    names.get(int(oif)) if oif is not None else None,
                    local=int(m["type"]) == _RTN_LOCAL))
            out[addr] = tuple(found)
    return out


def list_routes(proto: int = RT_PROTO, table: int = MAIN_TABLE) -> tuple[Route, ...]:
    """Our IPv4 routes (by protocol number) in ``table``, as :class:`Route` records."""
    with _session(f"listing routes of protocol {proto}") as ipr:
        names = _names(ipr)
        msgs = ipr.route("dump", family=socket.AF_INET, proto=proto, table=table)
        routes = []
        for m in msgs:
            if int(m["proto"]) != proto or int(m.get("RTA_TABLE") or m["table"]) != table:
                continue
            dst = m.get("RTA_DST") or "0.0.0.0"
            gw = m.get("RTA_GATEWAY")
            oif = m.get("RTA_OIF")
            routes.append(Route(
                ipaddress.IPv4Network(f"{dst}/{int(m['dst_len'])}"),
                ipaddress.IPv4Address(gw) if gw else None,
                names.get(int(oif), f"if{oif}") if oif is not None else "?"))
    routes.sort(key=Route.sort_key)
    return tuple(routes)


def apply_ops(ops: Sequence[RouteOp], proto: int = RT_PROTO, table: int = MAIN_TABLE
              ) -> list[str]:
    """Run a plan's operations in order; returns one message per operation that failed.

    A failed operation does not stop the others (one unreachable peer must not
    keep the rest from being routed). Deleting a route that is already gone is
    success: the plan's goal holds.
    """
    errors: list[str] = []
    if not ops:
        return errors
    with _session("applying routes") as ipr:
        index = {name: idx for idx, name in _names(ipr).items()}
        for op in ops:
            r = op.route
            try:
                if op.kind is OpKind.DELETE:
                    # scope "nowhere" matches any scope, as `ip route del` does.
                    ipr.route("del", dst=str(r.dst), proto=proto, table=table,
                              scope=_RT_SCOPE_NOWHERE)
                    continue
                oif = index.get(r.dev)
                if oif is None:
                    errors.append(f"{op}: no device {r.dev}")
                    continue
                kw: dict[str, Any] = {"dst": str(r.dst), "oif": oif, "proto": proto,
                                      "table": table}
                if r.via is not None:
                    kw["gateway"] = str(r.via)
                else:
                    kw["scope"] = _RT_SCOPE_LINK  # as `ip route replace <net> dev <dev>`
                ipr.route("replace", **kw)
            except _PyNetlinkError as e:
                if op.kind is OpKind.DELETE and e.code == errno.ESRCH:
                    continue
                errors.append(f"{op}: {e.args[1] if len(e.args) > 1 else e}")
    return errors


def remove_routes(proto: int = RT_PROTO, table: int = MAIN_TABLE) -> tuple[Route, ...]:
    """Delete every route carrying ``proto`` in ``table``; returns what was removed."""
    routes = list_routes(proto, table)
    errors = apply_ops([RouteOp(OpKind.DELETE, r) for r in routes], proto, table)
    if errors:
        raise NetlinkError("; ".join(errors))
    return routes


def link_exists(name: str) -> bool:
    with _session(f"looking up device {name}") as ipr:
        return bool(ipr.link_lookup(ifname=name))


def delete_link(name: str) -> bool:
    """Delete device ``name`` if it exists (e.g. a persistent TUN); True if it was there."""
    with _session(f"deleting device {name}") as ipr:
        idx = ipr.link_lookup(ifname=name)
        if not idx:
            return False
        ipr.link("del", index=idx[0])
        return True


def ip_forward_enabled(path: str = IP_FORWARD) -> bool:
    """net.ipv4.ip_forward: DirectRouting and host-gw peers send us plain routed packets."""
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


# ---- async wrappers ---------------------------------------------------------------------------
async def aroute_get(addresses: Iterable[ipaddress.IPv4Address]
                     ) -> dict[ipaddress.IPv4Address, tuple[RouteLookup, ...] | None]:
    return await asyncio.to_thread(route_get, list(addresses))


async def alist_routes(proto: int = RT_PROTO, table: int = MAIN_TABLE) -> tuple[Route, ...]:
    return await asyncio.to_thread(list_routes, proto, table)


async def aapply_ops(ops: Sequence[RouteOp], proto: int = RT_PROTO, table: int = MAIN_TABLE
                     ) -> list[str]:
    return await asyncio.to_thread(apply_ops, list(ops), proto, table)


# ---- change events ----------------------------------------------------------------------------
_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV4_ROUTE = 0x40
_RTM_NEWROUTE, _RTM_DELROUTE = 24, 25
_NLMSG_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")


def relevant_events(buf: bytes, own_proto: int = RT_PROTO) -> int:
    """How many rtnetlink messages in ``buf`` may change a peer's reachability.

    Route events with our own protocol number are our own doing and do not
    count; link and address events, and everybody else's routes, do.
    """
    count, off = 0, 0
    while off + _NLMSG_HDR.size <= len(buf):
        length, mtype, _, _, _ = _NLMSG_HDR.unpack_from(buf, off)
        if length < _NLMSG_HDR.size:
            break
        body = off + _NLMSG_HDR.size
        if mtype in (_RTM_NEWROUTE, _RTM_DELROUTE) and body + _RTMSG.size <= len(buf):
            proto = _RTMSG.unpack_from(buf, body)[5]
            if proto != own_proto:
                count += 1
        elif mtype >= 16:  # not NOOP/ERROR/DONE/OVERRUN (a cut-off route message counts)
            count += 1
        off += (length + 3) & ~3
    return count


class ChangeMonitor:
    """Tells the agent when links, our addresses or others' routes change.

    Usage: ``async with ChangeMonitor() as mon: while True: await mon.wait(); ...``.
    Bursts (an address add brings several routes) are coalesced over ``debounce``
    seconds. A receive-buffer overflow (ENOBUFS) counts as a change.
    """

    def __init__(self, *, own_proto: int = RT_PROTO, debounce: float = 0.3) -> None:
        self.own_proto = own_proto
        self.debounce = debounce
        self._sock: socket.socket | None = None
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> ChangeMonitor:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Subscribe; NetlinkError if the kernel will not let us (no traceback for callers)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        except OSError as e:
            raise NetlinkError(f"cannot open an rtnetlink socket: {e}") from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE))
        except OSError as e:
            sock.close()
            raise NetlinkError(f"cannot subscribe to route/address events: {e}") from e
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                buf = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._event.set()
                    continue
                return
            if relevant_events(buf, self.own_proto):
                self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Return True after a relevant change (and a quiet ``debounce``), False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        for _ in range(20):  # coalesce a burst, but never wait forever
            self._event.clear()
            await asyncio.sleep(self.debounce)
            if not self._event.is_set():
                break
        self._event.clear()
        return True
