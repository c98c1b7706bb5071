"""In-memory TUN and UDP devices, so the engine's loops run in unit tests without root.

They are the real :class:`TunDevice` / :class:`UdpEndpoint` with only the
system calls replaced (the attributes the real ones bind to ``os.readv``,
``recvmsg_into``, ``sendmsg``, ``sendto``), so the batch layout, the TSO split,
the GSO run logic and its fallback are the product's own code. The fake UDP
endpoint segments a GSO send the way the kernel does and can deliver GRO
batches; both can be told to fail.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from dataplane.tun import TunDevice
from dataplane.txtap import TunnelTx
from dataplane.udp import SOL_UDP, UDP_GRO, UDP_SEGMENT, Address, UdpEndpoint
from dataplane.vnet import VNET_HDR_LEN


class FakeTun(TunDevice):
    """A TUN whose reads come from :attr:`inbound` and whose writes land in :attr:`written`.

    Queue ``vnet header + IPv4`` (``queue_packet`` adds a zero header).
    """

    def __init__(self, name: str = "fake0", *, offload: bool = False) -> None:
        self.inbound: deque[bytes | OSError] = deque()
        self.written: list[bytes] = []
        self.fail_writes = False
        super().__init__(name, offload=offload, readv=self._fake_readv, write=self._fake_write)

    def queue_packet(self, packet: bytes, vnet_hdr: bytes = bytes(VNET_HDR_LEN)) -> None:
        self.inbound.append(vnet_hdr + packet)

    def _fake_readv(self, bufs: list[memoryview]) -> int:
        if not self.inbound:
            raise BlockingIOError
        item = self.inbound.popleft()
        if isinstance(item, OSError):
            raise item
        n = min(len(item), len(bufs[0]))
        bufs[0][:n] = item[:n]
        return n

    def _fake_write(self, data: memoryview | bytes) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "fake TUN refuses writes")
        self.written.append(bytes(data))
        return len(data)


@dataclass
class Sent:
    """One datagram the fake endpoint put on the wire."""

    data: bytes
    addr: Address
    gso_call: int  # 0 for sendto, else the number of the GSO call that carried it
    sport: int = 8472  # the source port: the lane's (lane 0 is the bound 8472)


@dataclass
class _Inbound:
    data: bytes
    step: int
    src: Address


class FakeUdp(UdpEndpoint):
    """A UDP endpoint whose receives come from :attr:`inbound` (``queue``/``queue_gro``)."""

    def __init__(self, *, gro: bool = True, lanes: int = 0) -> None:
        """``lanes``: source-port lanes, sending from ports 40001, 40002, ..."""
        self.refuse_gso = False  # sendmsg with UDP_SEGMENT fails with EIO, as without offload
        self.fail_sends = False
        self.sent: list[Sent] = []
        self.inbound: deque[_Inbound | OSError] = deque()
        self.gso_calls = 0
        super().__init__(gro=gro, gso=True, recvmsg=self._fake_recvmsg,
                         sendmsg=self._fake_sendmsg, sendto=self._fake_sendto)
        self.ports[0] = 8472
        for k in range(lanes):
            port = 40001 + k
            self.add_lane(functools.partial(self._fake_sendmsg, sport=port),
                          functools.partial(self._fake_sendto, sport=port), port)

    def queue(self, data: bytes, src: str, port: int = 8472) -> None:
        self.inbound.append(_Inbound(data, len(data), (src, port)))

    def queue_gro(self, datagrams: list[bytes], src: str, port: int = 8472) -> None:
        """One GRO batch: same-size datagrams (the last may be shorter) back to back."""
        self.inbound.append(_Inbound(b"".join(datagrams), len(datagrams[0]), (src, port)))

    def _fake_recvmsg(self, bufs: list[memoryview], ancbufsize: int, flags: int
                      ) -> tuple[int, list[tuple[int, int, bytes]], int, Address]:
        if not self.inbound:
            raise BlockingIOError
        item = self.inbound.popleft()
        if isinstance(item, OSError):
            raise item
        n = len(item.data)
        bufs[0][:n] = item.data
        anc = [(SOL_UDP, UDP_GRO, struct.pack("=i", item.step))] if item.step != n else []
        return n, anc, 0, item.src

    def _fake_sendmsg(self, bufs: list[memoryview], anc: list[tuple[int, int, bytes]],
                      flags: int, addr: Address, sport: int = 8472) -> int:
        data = b"".join(bytes(b) for b in bufs)
        seg = next((struct.unpack("=H", d)[0] for lvl, kind, d in anc
                    if lvl == SOL_UDP and kind == UDP_SEGMENT), 0)
        if seg and self.refuse_gso:
            raise OSError(errno.EIO, "no UDP GSO")
        if self.fail_sends:
            raise OSError(errno.ENOBUFS, "fake send failure")
        self.gso_calls += 1
        for off in range(0, len(data), seg or len(data)):
            self.sent.append(Sent(data[off:off + (seg or len(data))], addr, self.gso_calls,
                                  sport))
        return len(data)

    def _fake_sendto(self, data: memoryview | bytes, addr: Address, sport: int = 8472) -> int:
        if self.fail_sends:
            raise OSError(errno.ENOBUFS, "fake send failure")
        self.sent.append(Sent(bytes(data), addr, 0, sport))
        return len(data)


class FakeTunnel(TunnelTx):
    """A tunnel-GSO TAP whose writes land in :attr:`written` (header and inner joined)."""

    def __init__(self, name: str = "fltx0", mac: bytes = b"\x02\x00\x00\x00\x00\x77") -> None:
        self.written: list[tuple[bytes, bytes]] = []
        self.fail_writes = False
        super().__init__(name, mac, writev=self._fake_writev)

    def _fake_writev(self, parts: Sequence[bytes | memoryview]) -> int:
        if self.fail_writes:
            raise OSError(errno.EIO, "fake TAP refuses writes")
        self.written.append((bytes(parts[0]), b"".join(bytes(p) for p in parts[1:])))
        return sum(len(p) for p in parts)
