"""The packet engine: TUN <-> VXLAN over UDP, driven by asyncio reader callbacks.

Two callbacks run on the event loop (uvloop or plain asyncio), each draining
up to ``batch`` ready packets per wake-up, with no await and no allocation
beyond what a system call returns:

- TUN readable: read ``vnet_hdr + IP`` into a preallocated buffer at offset 12,
  so the IP packet lands at offset 22; write Ethernet over the 10 vnet-header
  bytes (the VXLAN header at 0..8 is written once); ``sendto`` the peer.
- UDP readable: ``recvfrom_into`` at offset 0; validate in place
  (:func:`wire.check_frame`); write the vnet header over the VXLAN/Ethernet
  bytes at 12..22 (:func:`offload.fill_rx_vnet_hdr`); write ``buf[12:]`` to
  the TUN.

Header room in front of the payload is what lets encapsulation and
decapsulation happen without copying the packet.

The engine never installs routes: the control plane routes the overlay (or
each peer subnet) into the TUN. :meth:`set_peers` swaps one reference to a
table built from the whole peer set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from dataplane import offload, tun, udp, wire
from dataplane.errors import ConfigError
from dataplane.fib import Fib, Peer
from dataplane.stats import EngineStats, PeerCounters
from dataplane.wire import DropReason, Frame

_HEAD = wire.ENCAP_HLEN - offload.VNET_HDR_LEN  # 12: where a TUN read starts in the buffer
_BUF = 65536 + 64
_ZERO_VNET = bytes(offload.VNET_HDR_LEN)


@dataclass(frozen=True)
class EngineConfig:
    """What one engine needs; the knobs after ``port`` all have safe defaults."""

    subnet: ipaddress.IPv4Network
    public_ip: ipaddress.IPv4Address
    vtep_mac: bytes
    vni: int = 1
    mtu: int = 1450  # TUN MTU = external MTU - 50
    tun_name: str | None = None  # default f"flannel.{vni}"
    port: int = wire.VXLAN_PORT
    batch: int = 256  # packets drained per reader wake-up before yielding to the loop
    tun_txqueuelen: int | None = 1000  # the TUN default (500) overflows under TCP bursts
    socket_buffer: int = udp.BUFFER_BYTES

    def __post_init__(self) -> None:
        if len(self.vtep_mac) != 6 or self.vtep_mac[0] & 1:
            raise ConfigError(f"VtepMAC must be a 6-byte unicast MAC, got {self.vtep_mac.hex()}")
        if not 0 <= self.vni < 1 << 24:
            raise ConfigError(f"VNI must be in 0..16777215, got {self.vni}")
        if not 68 <= self.mtu <= 65000:
            raise ConfigError(f"MTU must be in 68..65000, got {self.mtu}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")
        name = self.device_name
        if not name or len(name.encode()) > 15:
            raise ConfigError(f"TUN name must be 1..15 bytes, got {name!r}")

    @property
    def device_name(self) -> str:
        return self.tun_name or f"flannel.{self.vni}"


# Per tunnelled peer, what the hot path needs: (VtepMAC, sendto address, counters).
# counters = [tx_packets, tx_bytes, rx_packets, rx_bytes]
_Route = tuple[bytes, tuple[str, int], list[int]]


@dataclass(frozen=True)
class _Table:
    """Everything derived from one peer set, swapped as one reference."""

    fib: Fib
    mask: int
    tx: dict[int, _Route]  # masked destination -> route
    rx: dict[str, _Route]  # peer PublicIP string -> route


class Engine:
    """A userspace VXLAN endpoint on one TUN device and one UDP socket."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._vxlan = wire.vxlan_header(config.vni)
        self._own_mac = config.vtep_mac
        self._table = _Table(Fib.build(()), 0xFFFFFFFF, {}, {})
        self._counters: dict[str, list[int]] = {}
        self._drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        # [tun_packets, udp_packets, tun_wakeups, udp_wakeups, tun_max, udp_max,
        #  arp_replies, icmp, rx_csum_partial, rx_gso]
        self._n = [0] * 10
        self._tun_fd = -1
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tun_name = config.device_name
        # TUN -> UDP buffer: VXLAN header written once at 0..8, reads land at _HEAD.
        self._txbuf = bytearray(_BUF)
        self._txbuf[0:wire.VXLAN_HLEN] = self._vxlan
        self._txview = memoryview(self._txbuf)
        self._txin = [self._txview[_HEAD:]]
        self._eth_tail = self._own_mac + wire.ETH_P_IP.to_bytes(2, "big")  # bytes 14..22
        # UDP -> TUN buffer.
        self._rxbuf = bytearray(_BUF)
        self._rxview = memoryview(self._rxbuf)

    # ---- public API -------------------------------------------------------------------
    @property
    def tun_name(self) -> str:
        return self._tun_name

    async def start(self) -> None:
        """Open and configure the TUN, bind the UDP socket, register the readers."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._tun_fd, self._tun_name = tun.open_tun(self._tun_name, vnet_hdr=True)
        try:
            await tun.configure(self._tun_name, f"{cfg.subnet.network_address}/32", cfg.mtu,
                                cfg.tun_txqueuelen)
            self._sock = udp.open_udp(str(cfg.public_ip), cfg.port, cfg.socket_buffer)
        except BaseException:
            os.close(self._tun_fd)
            self._tun_fd = -1
            raise
        self._loop.add_reader(self._tun_fd, self._on_tun)
        self._loop.add_reader(self._sock.fileno(), self._on_udp)

    def set_peers(self, peers: Iterable[Peer]) -> None:
        """Replace the whole peer set at once; only Path.VXLAN peers are tunnelled."""
        fib = Fib.build(peers)
        counters: dict[str, list[int]] = {}
        tx: dict[int, _Route] = {}
        rx: dict[str, _Route] = {}
        for key, e in fib.entries.items():
            name = str(e.peer.subnet)
            c = self._counters.get(name) or [0, 0, 0, 0]
            counters[name] = c
            route: _Route = (e.vtep_mac, (e.public_ip_str, self.config.port), c)
            tx[key] = route
            rx[e.public_ip_str] = route
        self._counters = counters
        self._table = _Table(fib, fib.mask, tx, rx)

    @property
    def fib(self) -> Fib:
        return self._table.fib

    def snapshot(self) -> EngineStats:
        """A frozen copy of every counter."""
        n = self._n
        return EngineStats(
            peers={k: PeerCounters(*c) for k, c in self._counters.items()},
            drops={r.value: v for r, v in self._drops.items()},
            tun_packets=n[0], udp_packets=n[1], tun_wakeups=n[2], udp_wakeups=n[3],
            tun_max_batch=n[4], udp_max_batch=n[5], arp_replies=n[6], icmp_unreachable=n[7],
            rx_csum_partial=n[8], rx_gso=n[9],
        )

    async def close(self) -> None:
        """Unregister the readers and close the TUN (which deletes it) and the socket."""
        loop = self._loop
        if self._tun_fd >= 0:
            if loop is not None:
                loop.remove_reader(self._tun_fd)
            os.close(self._tun_fd)
            self._tun_fd = -1
        if self._sock is not None:
            if loop is not None:
                loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # ---- hot path: TUN -> UDP ---------------------------------------------------------
    def _on_tun(self) -> None:
        fd, bufs, buf, view = self._tun_fd, self._txin, self._txbuf, self._txview
        sock = self._sock
        if sock is None:
            return
        table = self._table
        tx, mask = table.tx, table.mask
        sendto, readv = sock.sendto, os.readv
        eth_tail, drops, mtu = self._eth_tail, self._drops, self.config.mtu
        count = 0
        batch = self.config.batch
        while count < batch:
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError:
                drops[DropReason.TRUNCATED] += 1
                break
            count += 1
            plen = n - offload.VNET_HDR_LEN
            bad = wire.check_tun_packet(buf, wire.OFF_IP, plen, mtu)
            if bad is not None:
                drops[bad] += 1
                continue
            route = tx.get(int.from_bytes(buf[38:42], "big") & mask)
            if route is None:
                self._unreachable(plen)
                continue
            buf[8:14] = route[0]
            buf[14:22] = eth_tail
            try:
                sendto(view[:n + _HEAD], route[1])
            except OSError:
                drops[DropReason.SEND_FAILED] += 1
                continue
            c = route[2]
            c[0] += 1
            c[1] += plen
        nn = self._n
        nn[0] += count
        nn[2] += 1
        if count > nn[4]:
            nn[4] = count

    def _unreachable(self, plen: int) -> None:
        """No peer owns the destination: count it and answer ICMP host unreachable.

        The error comes from the address a VTEP for the destination's subnet would
        have (its network address), not from our TUN address: the kernel drops
        packets arriving with one of its own addresses as source.
        """
        self._drops[DropReason.NO_ROUTE] += 1
        dst = int.from_bytes(self._txbuf[38:42], "big") & self._table.mask
        reply = wire.icmp_unreachable(self._txview[wire.OFF_IP:wire.OFF_IP + plen],
                                      dst.to_bytes(4, "big"))
        if reply is None:
            return
        try:
            os.write(self._tun_fd, _ZERO_VNET + reply)
            self._n[7] += 1
        except OSError:
            self._drops[DropReason.TUN_WRITE_FAILED] += 1

    # ---- hot path: UDP -> TUN ---------------------------------------------------------
    def _on_udp(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buf, view, fd = self._rxbuf, self._rxview, self._tun_fd
        rx = self._table.rx
        recv, write, check, fill = (sock.recvfrom_into, os.write, wire.check_frame,
                                    offload.fill_rx_vnet_hdr)
        vx, own, mtu, drops, nn = self._vxlan, self._own_mac, self.config.mtu, self._drops, self._n
        dontwait = socket.MSG_DONTWAIT
        count = 0
        batch = self.config.batch
        while count < batch:
            try:
                n, addr = recv(buf, 0, dontwait)
            except BlockingIOError:
                break
            except OSError:
                break
            count += 1
            route = rx.get(addr[0])
            verdict = check(buf, n, vx, own, mtu, route is not None)
            if verdict is Frame.IPV4:
                ip_len = (buf[24] << 8) | buf[25]
                kind = fill(buf, _HEAD, wire.OFF_IP, ip_len, mtu)
                try:
                    write(fd, view[_HEAD:wire.OFF_IP + ip_len])
                except OSError:
                    drops[DropReason.TUN_WRITE_FAILED] += 1
                    continue
                if kind:
                    nn[7 + kind] += 1
                if route is not None:  # always: check_frame refused unknown peers
                    c = route[2]
                    c[2] += 1
                    c[3] += ip_len
            elif verdict is Frame.ARP:
                self._arp(n, addr[0])
            else:
                drops[verdict] += 1
        nn[1] += count
        nn[3] += 1
        if count > nn[5]:
            nn[5] = count

    def _arp(self, n: int, src: str) -> None:
        """Answer an ARP request for an address of our subnet (kernel peers w/o neighbour)."""
        answer = wire.arp_answer(self._vxlan, self._own_mac, self.config.subnet,
                                 bytes(self._rxbuf[wire.OFF_IP:n]))
        if isinstance(answer, DropReason):
            self._drops[answer] += 1
            return
        assert self._sock is not None
        try:
            self._sock.sendto(answer, (src, self.config.port))
            self._n[6] += 1
        except OSError:
            self._drops[DropReason.SEND_FAILED] += 1
