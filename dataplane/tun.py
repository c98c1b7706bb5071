"""The TUN device: open (python-pytun), offloads (one ioctl), link set-up (pyroute2), batches.

Opened through python-pytun with ``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` (pytun
2.4.2 takes any flags); ``TUNSETOFFLOAD``, which pytun does not wrap, is one
``ioctl`` on its ``fileno()``. The device is not persistent: closing it deletes
it, and with it every address and route on it, so a crashed engine leaves
nothing behind.

:meth:`TunDevice.read_batch` hides the vnet header: it fills a caller-owned
:class:`TxBatch` with IPv4 packets, each with 22 bytes of header room in front
of it, so the engine writes VXLAN + Ethernet there and hands runs of
back-to-back datagrams to one UDP GSO send; with TSO a super-packet is
returned whole, marked with its MSS. The system
calls are reached through two attributes (``_readv``, ``_write``), which is all
a fake device (tests/devices.py) replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
from collections.abc import Callable

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dataplane import csum, vnet, wire
from dataplane.errors import DeviceError
from dataplane.tunnel_gso import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from dataplane.wire import DropReason

TUNSETOFFLOAD = 0x400454D0
OFFLOAD_TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

HEAD = wire.ENCAP_HLEN - vnet.VNET_HDR_LEN  # 12: where a read starts inside a packet slot
_SUPER = 65536 + 64  # one TSO super-packet (and its vnet header)
_UDP_MAX = 65507
GSO_MAX_SEGS = 64


class TxBatch:
    """Caller-owned packets for one TUN read batch.

    Packet ``i`` occupies ``buf[off[i]:off[i] + 22 + size[i]]``: 22 bytes of header
    room, then ``size[i]`` bytes of IPv4. ``csum[i]`` is 0 when the packet's
    checksums are complete, else ``csum_start << 8 | csum_offset`` of a partial
    TCP/UDP checksum (NEEDS_CSUM from the TUN, or a TSO segment). Full-size
    packets lie back to back, so a run of them is one UDP GSO datagram train.
    ``gso[i]`` is 0, or (TSO mode) the MSS of a whole TCP super-packet, for the
    engine to cut or hand to the kernel. ``rejects`` holds ``(reason, packet
    bytes)`` per packet the device refused.
    """

    __slots__ = ("buf", "count", "csum", "error", "gso", "nslots", "off", "reads", "rejects",
                 "size", "slot_views", "stride", "view")

    def __init__(self, mtu: int, slots: int, tso: bool) -> None:
        self.stride = wire.ENCAP_HLEN + mtu
        if tso:  # packets back to back, super-packets whole: room for four of ~64 KB
            self.nslots = 4 * GSO_MAX_SEGS
            size = 4 * _SUPER
        else:  # one packet per slot, slot k at k * stride (the last slot can hold any read)
            self.nslots = max(1, min(GSO_MAX_SEGS, slots))
            size = self.nslots * self.stride + _SUPER
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.off = [i * self.stride for i in range(self.nslots)]
        self.size = [0] * self.nslots
        self.csum = [0] * self.nslots
        self.gso = [0] * self.nslots
        self.slot_views = [[self.view[o + HEAD:]] for o in self.off]
        self.count = 0
        self.reads = 0  # TUN reads behind this batch (a super-packet is one read, many packets)
        self.rejects: list[tuple[DropReason, bytes]] = []
        self.error: DropReason | None = None


def _readv_closed(bufs: list[memoryview]) -> int:
    raise BlockingIOError


def _write_closed(data: memoryview | bytes) -> int:
    raise OSError(9, "device closed")


class TunDevice:
    """One TUN device read and written in batches; ``offload`` = TUN TSO super-packets."""

    def __init__(self, name: str, *, offload: bool = False,
                 readv: Callable[[list[memoryview]], int] = _readv_closed,
                 write: Callable[[memoryview | bytes], int] = _write_closed,
                 fd: int = -1) -> None:
        self.name = name
        self.offload = offload
        self._fd = fd
        self._readv = readv
        self._write = write
        self._dev: pytun.TunTapDevice | None = None
        self.last_errno = 0  # of the last failed read (EBADFD: the device was deleted)

    # ---- opening and set-up ------------------------------------------------------------
    @classmethod
    def open(cls, name: str, *, offload: bool = False, multi_queue: bool = False) -> TunDevice:
        """Create TUN ``name`` with a vnet header (and TSO if ``offload``), non-blocking.

        ``multi_queue``: ``IFF_MULTI_QUEUE``; every process that opens the same name so
        gets its own queue (the kernel spreads flows over queues by their hash).
        """
        if not name or len(name.encode()) > 15:
            raise DeviceError(f"TUN name must be 1..15 bytes, got {name!r}")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except (pytun.Error, OSError) as e:
            raise DeviceError(f"cannot create TUN {name}: {e}") from None
        fd = dev.fileno()
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        if offload:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOAD_TSO)
            except OSError as e:
                dev.close()
                raise DeviceError(f"TUNSETOFFLOAD {OFFLOAD_TSO:#x} refused: {e.strerror}"
                                  ) from None
        # partial() of the C functions: no Python frame per system call.
        self = cls(dev.name, offload=offload, fd=fd, readv=functools.partial(os.readv, fd),
                   write=functools.partial(os.write, fd))
        self._dev = dev
        return self

    async def configure(self, address: str, mtu: int, txqueuelen: int | None,
                        gso_max_size: int | None = None) -> None:
        """Address (``a.b.c.d/32``), MTU, queue length, no IPv6 chatter, and up (pyroute2).

        ``gso_max_size`` caps TSO super-packets (so one plus 50 bytes of outer headers
        fits an IPv4 packet); a kernel that refuses to set it keeps its default.
        """
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass  # IPv6 disabled or absent: nothing to silence
        await asyncio.to_thread(_configure_link, self.name, address, mtu, txqueuelen,
                                gso_max_size)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Close the descriptor, which deletes the device (and its routes)."""
        self._readv = _readv_closed
        self._write = _write_closed
        if self._dev is not None:
            self._dev.close()
            self._dev = None
        self._fd = -1

    # ---- packets ------------------------------------------------------------------------
    def write(self, data: memoryview | bytes) -> bool:
        """One packet with its vnet header in front (a GRO super-packet too); False: refused."""
        try:
            self._write(data)
        except OSError:
            return False
        return True

    def read_batch(self, b: TxBatch) -> int:
        """Fill ``b`` with what the TUN has ready; returns the number of packets.

        ``b.reads`` is the number of reads behind them: 0 means the TUN is drained
        (or failed: ``b.error``); with TSO, reads can yield rejects and no packet.
        """
        b.error = None
        if b.rejects:
            b.rejects.clear()
        if self.offload:
            return self._read_whole(b)
        readv, views, size = self._readv, b.slot_views, b.size
        i = 0
        n_slots = b.nslots
        while i < n_slots:
            try:
                n = readv(views[i])
            except BlockingIOError:
                break
            except OSError as e:
                b.error = DropReason.TUN_READ_FAILED
                self.last_errno = e.errno or 0
                break
            size[i] = n - vnet.VNET_HDR_LEN
            i += 1
        b.count = b.reads = i
        return i

    def _read_whole(self, b: TxBatch) -> int:
        """TSO mode: read straight into the batch; a TCP super-packet stays whole with
        ``gso[i]`` = its MSS (the engine cuts it, or has the kernel cut it after
        encapsulation); anything else is an ordinary packet."""
        readv, view, buf = self._readv, b.view, b.buf
        off, size, csums, gsos = b.off, b.size, b.csum, b.gso
        unpack = vnet.VNET_HDR.unpack_from
        limit = len(buf) - _SUPER
        pos = i = reads = 0
        n_slots = b.nslots
        while pos <= limit and i < n_slots:
            try:
                n = readv([view[pos + HEAD:]])
            except BlockingIOError:
                break
            except OSError as e:
                b.error = DropReason.TUN_READ_FAILED
                self.last_errno = e.errno or 0
                break
            reads += 1
            plen = n - vnet.VNET_HDR_LEN
            ip = pos + wire.ENCAP_HLEN
            if plen < 20:
                b.rejects.append((DropReason.TRUNCATED, bytes(view[ip:ip + max(plen, 0)])))
                continue
            flags, gso_type, _, gso_size, cstart, coff = unpack(buf, pos + HEAD)
            if gso_type == vnet.GSO_NONE:
                gsos[i] = 0
                csums[i] = (cstart << 8 | coff) if flags & vnet.F_NEEDS_CSUM else 0
            elif (gso_type & ~vnet.GSO_ECN == vnet.GSO_TCPV4 and gso_size > 0
                  and buf[ip] >> 4 == 4 and buf[ip + 9] == 6):
                gsos[i] = gso_size
                csums[i] = ((buf[ip] & 0x0F) << 10) | csum.TCP_CSUM_OFFSET
            else:
                b.rejects.append((DropReason.UNSUPPORTED_GSO, bytes(view[ip:ip + plen])))
                continue
            off[i] = pos
            size[i] = plen
            i += 1
            pos = ip + plen
        b.count = i
        b.reads = reads
        return i


def _configure_link(name: str, address: str, mtu: int, txqueuelen: int | None,
                    gso_max_size: int | None) -> None:
    """The synchronous pyroute2 part of :meth:`TunDevice.configure` (runs in a thread)."""
    addr, _, plen = address.partition("/")
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise DeviceError(f"TUN {name} vanished before it was configured")
            idx = found[0]
            ipr.addr("replace", index=idx, address=addr, prefixlen=int(plen or 32))
            kw: dict[str, int | str] = {"mtu": mtu, "state": "up"}
            if txqueuelen is not None:
                kw["txqlen"] = txqueuelen
            ipr.link("set", index=idx, **kw)
            if gso_max_size is not None:
                with contextlib.suppress(NetlinkError):  # an optimisation only
                    ipr.link("set", index=idx, gso_max_size=gso_max_size)
    except (NetlinkError, OSError) as e:
        raise DeviceError(f"configuring TUN {name} ({address}, mtu {mtu}): {e}") from None
