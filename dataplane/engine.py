"""The packet engine: TUN <-> VXLAN over UDP, driven by asyncio reader callbacks.

Two callbacks run on the event loop (uvloop or plain asyncio), each draining
up to ``batch`` ready packets per wake-up, with no await and no allocation
beyond what a system call returns:

- TUN readable: read ``vnet_hdr + IP`` into a preallocated slot at offset 12,
  so the IP packet lands at offset 22; write VXLAN + Ethernet over the 10
  vnet-header bytes and what precedes them; full-size packets to one peer fill
  consecutive slots and leave in one UDP GSO ``sendmsg`` (else ``sendto``).
- UDP readable: with UDP GRO, one ``recvmsg_into`` returns a batch of datagrams,
  checked and merged per TCP flow into one GSO TUN write (userspace GRO);
  without, ``recvfrom_into`` at offset 0; validate in place
  (:func:`wire.check_frame`); write the vnet header over the VXLAN/Ethernet
  bytes at 12..22 (:func:`vnet.fill_rx_vnet_hdr`); write ``buf[12:]`` to
  the TUN.
- Offload mode adds TUN TSO: one read is a ~64 KB super-packet, split into MSS
  segments (full TCP checksums, or only the pseudo-header sum for a peer known
  to be flannelette, :attr:`dataplane.fib.Peer.partial_csum`).

Header room in front of the payload is what lets encapsulation and
decapsulation happen without copying the packet.

The engine never installs routes: the control plane routes the overlay (or
each peer subnet) into the TUN. :meth:`set_peers` swaps one reference to a
table built from the whole peer set.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from dataplane import csum, gro, tso, tun, udp, vnet, wire
from dataplane.errors import ConfigError, DeviceError
from dataplane.fib import Fib, Peer
from dataplane.stats import EngineStats, PeerCounters
from dataplane.wire import DropReason, Frame

_HEAD = wire.ENCAP_HLEN - vnet.VNET_HDR_LEN  # 12: where a TUN read starts in the buffer
_BUF = 65536 + 64
_ZERO_VNET = bytes(vnet.VNET_HDR_LEN)


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
    # TUN TSO + UDP GSO/GRO + userspace GRO: one system call moves up to ~64 KB.
    offload: bool = False
    # Receive with UDP GRO + userspace GRO even without ``offload`` (it needs no TUN
    # offload: the TUN accepts GSO writes anyway); skipped if the kernel refuses UDP_GRO.
    rx_gro: bool = True
    # Without ``offload``: full-size packets to one peer that one wake-up drains are sent
    # with one UDP GSO call (the receiver sees ordinary datagrams).
    tx_gso: bool = True

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


# Per tunnelled peer, what the hot path needs: (VtepMAC, sendto address, counters,
# VXLAN + Ethernet prefix, peer accepts partial TCP checksums).
# counters = [tx_packets, tx_bytes, rx_packets, rx_bytes]
_Route = tuple[bytes, tuple[str, int], list[int], bytes, bool]
SOL_UDP = 17
UDP_SEGMENT = 103  # missing from Python 3.11's socket module
UDP_GRO = 104
_GSO_MAX_SEGS = 64
_UDP_MAX = 65507
_CMSG_GRO = socket.CMSG_SPACE(4)


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
        #  arp_replies, icmp, rx_csum_partial, rx_gso, tx_csum_partial]
        self._n = [0] * 11
        self._tun_fd = -1
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tun_name = config.device_name
        # TUN -> UDP buffer: VXLAN header written once at 0..8, reads land at _HEAD.
        # Without offload, packets are read into slots of one datagram each (VXLAN +
        # Ethernet + MTU), so full-size packets to one peer lie back to back, ready for
        # one UDP GSO send; every slot's view runs to the end (room for any read).
        self._stride = wire.ENCAP_HLEN + config.mtu
        nslots = max(1, min(_GSO_MAX_SEGS, _UDP_MAX // self._stride)) if config.tx_gso else 1
        self._txbuf = bytearray(nslots * self._stride + _BUF)
        self._txbuf[0:wire.VXLAN_HLEN] = self._vxlan
        self._txview = memoryview(self._txbuf)
        self._txin = [self._txview[_HEAD:]]
        self._slots = [[self._txview[i * self._stride + _HEAD:]] for i in range(nslots)]
        self._eth_tail = self._own_mac + wire.ETH_P_IP.to_bytes(2, "big")  # bytes 14..22
        # UDP -> TUN buffer.
        self._rxbuf = bytearray(_BUF)
        self._rxview = memoryview(self._rxbuf)
        # Offload mode: TSO segments are built here; GRO merges into the coalescer.
        self._segbuf = bytearray(2 * _BUF) if config.offload else bytearray()
        self._segview = memoryview(self._segbuf)
        self._gro = gro.Coalescer() if config.offload or config.rx_gro else None
        self._udp_gso = True  # cleared when the kernel refuses UDP_SEGMENT

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
            if cfg.offload:
                tun.set_offload(self._tun_fd, tun.TUN_F_CSUM | tun.TUN_F_TSO4
                                | tun.TUN_F_TSO6 | tun.TUN_F_TSO_ECN)
            rx_gro = cfg.offload or cfg.rx_gro
            if rx_gro:
                try:
                    self._sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                except OSError as e:
                    if cfg.offload:
                        raise DeviceError(f"UDP_GRO refused: {e.strerror}") from None
                    rx_gro = False  # an old kernel: one datagram per receive
        except BaseException:
            await self.close()
            raise
        self._loop.add_reader(self._tun_fd, self._on_tun_offload if cfg.offload else self._on_tun)
        self._loop.add_reader(self._sock.fileno(), self._on_udp_offload if rx_gro else self._on_udp)

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
            prefix = self._vxlan + e.vtep_mac + self._eth_tail
            route: _Route = (e.vtep_mac, (e.public_ip_str, self.config.port), c, prefix,
                             e.peer.partial_csum)
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
            rx_csum_partial=n[8], rx_gso=n[9], tx_csum_partial=n[10],
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
        """Drain the TUN; full-size packets to one peer go out in one UDP GSO send.

        Packet k of a run lands in slot k (stride VXLAN + Ethernet + MTU), its
        22-byte prefix written over the vnet header in front of it; a run ends at a
        shorter packet (GSO allows only the last one shorter), another peer, a full
        slot table or the end of the drain, and is sent with one ``sendmsg``.
        """
        fd, slots, buf = self._tun_fd, self._slots, self._txbuf
        sock = self._sock
        if sock is None:
            return
        table = self._table
        tx, mask = table.tx, table.mask
        readv, check, from_bytes = os.readv, wire.check_tun_packet, int.from_bytes
        drops, mtu, stride = self._drops, self.config.mtu, self._stride
        nslots = len(slots)
        full = mtu + vnet.VNET_HDR_LEN
        count = 0
        batch = self.config.batch
        start = nxt = 0  # the pending run is slots start..nxt-1
        run: _Route | None = None
        while count < batch:
            if nxt == nslots:
                if run is not None:
                    self._send_run(sock, start * stride, nxt * stride, run)
                start = nxt = 0
                run = None
            try:
                n = readv(fd, slots[nxt])
            except BlockingIOError:
                break
            except OSError:
                drops[DropReason.TRUNCATED] += 1
                break
            count += 1
            base = nxt * stride
            plen = n - vnet.VNET_HDR_LEN
            bad = check(buf, base + wire.OFF_IP, plen, mtu)
            if bad is not None:
                drops[bad] += 1
                continue
            route = tx.get(from_bytes(buf[base + 38:base + 42], "big") & mask)
            if route is None:
                self._unreachable(plen, base)
                continue
            if route is not run:
                if run is not None:
                    self._send_run(sock, start * stride, base, run)
                start = nxt
                run = route
            buf[base:base + wire.ENCAP_HLEN] = route[3]
            c = route[2]
            c[0] += 1
            c[1] += plen
            nxt += 1
            if n != full:  # shorter: the last of its run
                self._send_run(sock, start * stride, base + wire.ENCAP_HLEN + plen, route)
                start = nxt = 0
                run = None
        if run is not None:
            self._send_run(sock, start * stride, nxt * stride, run)
        nn = self._n
        nn[0] += count
        nn[2] += 1
        if count > nn[4]:
            nn[4] = count

    def _send_run(self, sock: socket.socket, first: int, end: int, route: _Route) -> None:
        """Send ``txbuf[first:end]``: one datagram, or a run of stride-sized ones via GSO."""
        if end - first <= self._stride:
            try:
                sock.sendto(self._txview[first:end], route[1])
            except OSError:
                self._drops[DropReason.SEND_FAILED] += 1
            return
        self._send_segments(sock, end - first, self._stride, route[1], self._txview[first:end])

    def _unreachable(self, plen: int, base: int = 0) -> None:
        """No peer owns the destination: count it and answer ICMP host unreachable.

        The error comes from the address a VTEP for the destination's subnet would
        have (its network address), not from our TUN address: the kernel drops
        packets arriving with one of its own addresses as source.
        """
        self._drops[DropReason.NO_ROUTE] += 1
        dst = int.from_bytes(self._txbuf[base + 38:base + 42], "big") & self._table.mask
        ip = base + wire.OFF_IP
        reply = wire.icmp_unreachable(self._txview[ip:ip + plen],
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
                                    vnet.fill_rx_vnet_hdr)
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

    # ---- offload mode: TUN TSO + UDP GSO out, UDP GRO + userspace GRO in -----------------
    def _on_tun_offload(self) -> None:
        """Read TSO super-packets; split into MSS segments; one UDP GSO send per ~64 KB."""
        sock = self._sock
        if sock is None:
            return
        fd, bufs, buf, view = self._tun_fd, self._txin, self._txbuf, self._txview
        table = self._table
        tx, mask = table.tx, table.mask
        drops, eth_tail = self._drops, self._eth_tail
        unpack = vnet.VNET_HDR.unpack_from
        count = 0
        batch = self.config.batch
        while count < batch:
            try:
                n = os.readv(fd, bufs)
            except BlockingIOError:
                break
            except OSError:
                drops[DropReason.TRUNCATED] += 1
                break
            count += 1
            plen = n - vnet.VNET_HDR_LEN
            bad = wire.check_tun_packet(buf, wire.OFF_IP, plen, 65535)
            if bad is not None:
                drops[bad] += 1
                continue
            route = tx.get(int.from_bytes(buf[38:42], "big") & mask)
            if route is None:
                self._unreachable(plen)
                continue
            flags, gso_type, _, gso_size, csum_start, csum_off = unpack(buf, _HEAD)
            c = route[2]
            if gso_type == vnet.GSO_NONE:
                if flags & vnet.F_NEEDS_CSUM and not route[4]:
                    csum.complete_checksum(buf, wire.OFF_IP, plen, csum_start, csum_off)
                buf[8:14] = route[0]
                buf[14:22] = eth_tail
                try:
                    sock.sendto(view[:n + _HEAD], route[1])
                except OSError:
                    drops[DropReason.SEND_FAILED] += 1
                    continue
                c[0] += 1
                c[1] += plen
            elif gso_type & ~vnet.GSO_ECN == vnet.GSO_TCPV4 and gso_size > 0:
                used, segs, seglen = tso.tso_split(buf, wire.OFF_IP, plen, gso_size,
                                                       self._segbuf, route[3], route[4])
                self._send_segments(sock, used, seglen, route[1])
                if route[4]:
                    self._n[10] += segs
                c[0] += segs
                c[1] += used - segs * wire.ENCAP_HLEN
            else:
                drops[DropReason.OVERSIZE] += 1
        nn = self._n
        nn[0] += count
        nn[2] += 1
        if count > nn[4]:
            nn[4] = count

    def _send_segments(self, sock: socket.socket, used: int, seglen: int,
                       addr: tuple[str, int], view: memoryview | None = None) -> None:
        """Send ``view[:used]`` (default the TSO segment buffer; datagrams of ``seglen``,
        the last shorter) to ``addr``: UDP GSO, per datagram if the kernel refuses it."""
        if view is None:
            view = self._segview
        per_call = min(_GSO_MAX_SEGS, _UDP_MAX // seglen) * seglen
        off = 0
        while off < used:
            chunk = min(used - off, per_call)
            if self._udp_gso:
                try:
                    sock.sendmsg([view[off:off + chunk]],
                                 [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seglen))], 0, addr)
                    off += chunk
                    continue
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                        self._drops[DropReason.SEND_FAILED] += 1
                        off += chunk
                        continue
                    self._udp_gso = False  # no UDP GSO here: one datagram per segment
            end = off + chunk
            while off < end:
                try:
                    sock.sendto(view[off:min(off + seglen, end)], addr)
                except OSError:
                    self._drops[DropReason.SEND_FAILED] += 1
                off += seglen

    def _on_udp_offload(self) -> None:
        """Receive GRO batches; check each datagram; merge TCP segments for the TUN."""
        sock, gro = self._sock, self._gro
        if sock is None or gro is None:
            return
        buf, view, fd = self._rxbuf, self._rxview, self._tun_fd
        rx = self._table.rx
        recvmsg, write, check, fill = (sock.recvmsg_into, os.write, wire.check_frame,
                                       vnet.fill_rx_vnet_hdr)
        vx, own, mtu, drops, nn = self._vxlan, self._own_mac, self.config.mtu, self._drops, self._n
        bufs = [view]
        dontwait = socket.MSG_DONTWAIT
        count = 0
        batch = self.config.batch
        while count < batch:
            try:
                n, anc, _, addr = recvmsg(bufs, _CMSG_GRO, dontwait)
            except BlockingIOError:
                break
            except OSError:
                break
            count += 1
            step = n
            if anc and n > wire.OFF_IP + 4:
                level, kind, data = anc[0]
                if level == SOL_UDP and kind == UDP_GRO:
                    step = struct.unpack("=i", data[:4])[0] or n
                    # A kernel VXLAN sender's ~64 KB datagram carries its inner MSS as
                    # gso_size: one frame, not a batch (its IP length covers it all).
                    if wire.OFF_IP + ((buf[24] << 8) | buf[25]) >= n:
                        step = n
            route = rx.get(addr[0])
            known = route is not None
            off = 0
            while off < n or off == 0:  # once at least: an empty datagram is counted too
                seg_n = min(step, n - off)
                seg = view[off:off + seg_n] if step != n else view
                off += step or 1
                verdict = check(seg, seg_n, vx, own, mtu, known)
                if verdict is Frame.IPV4:
                    ip_len = (seg[24] << 8) | seg[25]
                    if route is not None:
                        c = route[2]
                        c[2] += 1
                        c[3] += ip_len
                    if not (gro.ip_len and gro.append(seg, wire.OFF_IP, ip_len)):
                        if gro.ip_len:
                            self._write_gro(fd, gro.finish(mtu))
                        if not gro.can_start(seg, wire.OFF_IP, ip_len, mtu):
                            kind = fill(seg, _HEAD, wire.OFF_IP, ip_len, mtu)
                            try:
                                write(fd, seg[_HEAD:wire.OFF_IP + ip_len])
                            except OSError:
                                drops[DropReason.TUN_WRITE_FAILED] += 1
                                continue
                            if kind:
                                nn[7 + kind] += 1
                            continue
                        gro.start(seg, wire.OFF_IP, ip_len)
                    if off < n:  # the rest of the GRO batch: same flow, few comparisons
                        off, taken, nbytes = gro.extend(view, off, n, step,
                                                        bytes(seg[:wire.OFF_IP]))
                        if taken and route is not None:
                            c = route[2]
                            c[2] += taken
                            c[3] += nbytes
                    continue
                elif verdict is Frame.ARP:
                    if step == n:
                        self._arp(n, addr[0])
                    else:
                        drops[DropReason.ARP_IGNORED] += 1
                else:
                    drops[verdict] += 1
            if gro.ip_len:
                self._write_gro(fd, gro.finish(mtu))
        nn[1] += count
        nn[3] += 1
        if count > nn[5]:
            nn[5] = count

    def _write_gro(self, fd: int, packet: memoryview) -> None:
        try:
            os.write(fd, packet)
        except OSError:
            self._drops[DropReason.TUN_WRITE_FAILED] += 1
            return
        if packet[1] != vnet.GSO_NONE:
            self._n[9] += 1
        elif packet[0] & vnet.F_NEEDS_CSUM:
            self._n[8] += 1
