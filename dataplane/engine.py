"""The packet engine: TUN <-> VXLAN over UDP, one loop per direction.

``Engine(config, tun, udp)`` takes its devices (a :class:`dataplane.tun.TunDevice`
and a :class:`dataplane.udp.UdpEndpoint`, or the fakes in tests/devices.py);
:func:`open_engine` builds the real ones. Two reader callbacks run on the event
loop (uvloop or plain asyncio), each draining up to ``batch`` reads per wake-up,
with no await:

- **tx** (TUN readable): the device fills a batch of IPv4 packets, each with
  22 bytes of header room in front (with TSO on, a super-packet arrives already
  cut into MSS segments). Per packet: check, look up the peer (one mask, one
  dict access), complete a partial checksum unless the peer is a flannelette
  node, write the peer's VXLAN + Ethernet prefix into the room. Back-to-back
  packets of one size to one peer form a run that leaves in one UDP GSO call.
- **rx** (UDP readable): one receive is one datagram or a GRO batch of them.
  Per datagram: :func:`wire.check_frame`, the inner-source check (a peer may
  only send from its own subnet), then either merged into a GSO super-packet
  for one TUN write (userspace GRO; :meth:`Coalescer.extend` takes the rest of
  a batch of one flow in one pass) or written alone with its vnet header
  (:func:`vnet.fill_rx_vnet_hdr`) over the VXLAN/Ethernet bytes in front.

Counters are named (:class:`dataplane.stats.Counters`, per peer
:class:`~dataplane.stats.PeerStats`) and move after the I/O succeeded; every
failure is a drop under a :class:`DropReason`, counted per reason, peer and
direction, and kept by the flight recorder. A tap (:mod:`dataplane.tap`) sees
each packet's verdict while a capture or trace is attached.

The engine never installs routes: the control plane routes the overlay (or
each peer subnet) into the TUN. :meth:`set_peers` swaps one reference to a
table built from the whole peer set.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dataplane import csum, gro, tso, vnet, wire
from dataplane.errors import ConfigError, DeviceError
from dataplane.fib import Fib, Peer
from dataplane.recorder import FlightRecorder
from dataplane.stats import Counters, EngineStats, PeerStats
from dataplane.tap import TapHub, TapSubscriber
from dataplane.tun import HEAD, TunDevice, TxBatch
from dataplane.txtap import TunnelTx, host_reason
from dataplane.udp import GSO_MAX_SEGS, MAX_SOURCE_PORTS, UDP_MAX, UdpEndpoint
from dataplane.wire import ENCAP_HLEN, OFF_IP, DropReason, Frame

_RX_BUF = 65536 + 64
_GONE = (errno.EBADFD, errno.ENODEV)  # a read error that means the TUN was deleted
_ZERO_VNET = bytes(vnet.VNET_HDR_LEN)
TX = "tx"
RX = "rx"


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
    batch: int = 256  # reads drained per reader wake-up before yielding to the loop
    tun_txqueuelen: int | None = 1000  # the TUN default (500) overflows under TCP bursts
    socket_buffer: int = 4 << 20
    # TUN TSO: one TUN read is a ~64 KB super-packet, cut into MSS segments here.
    offload: bool = False
    # Receive with UDP GRO + userspace GRO (needs no TUN offload: the TUN accepts GSO
    # writes anyway); skipped if the kernel refuses UDP_GRO.
    rx_gro: bool = True
    # Full-size packets to one peer drained in one wake-up leave in one UDP GSO call
    # (the receiver sees ordinary datagrams).
    tx_gso: bool = True
    # Drop datagrams from a peer whose inner IPv4 source lies outside that peer's subnet.
    check_inner_source: bool = True
    # With ``offload``: hand each TCP super-packet, wrapped once in outer headers, to the
    # kernel through a TAP that segments it (dataplane/txtap.py). "auto": when the kernel
    # and host allow it, else the userspace split; "on": required; "off": never.
    tunnel_gso: str = "auto"
    tunnel_tap_name: str | None = None  # default f"fltx.{vni}"
    # After a wake-up that moved packets, poll for this long before sleeping again: trades
    # CPU for latency (a reply crossing the engine needs no process wake-up). 0 = off.
    busy_poll_us: int = 0
    # One of several worker processes sharing the devices: a multi-queue TUN (and TAP) and
    # an SO_REUSEPORT UDP socket, all opened under the same names and port.
    shared_devices: bool = False
    # Send lanes on ephemeral source ports: each inner flow leaves from the one its flow
    # hash picks (tunnel-GSO writes too), so receivers' RSS queues and SO_REUSEPORT
    # workers spread a sender's flows, as with the kernel's VXLAN. 0: all from ``port``.
    source_ports: int = 8

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
        if not 0 <= self.source_ports <= MAX_SOURCE_PORTS:
            raise ConfigError(f"source_ports must be in 0..{MAX_SOURCE_PORTS}, "
                              f"got {self.source_ports}")
        if not 0 <= self.busy_poll_us <= 10000:
            raise ConfigError(f"busy_poll_us must be in 0..10000, got {self.busy_poll_us}")
        if self.tunnel_gso not in ("auto", "on", "off"):
            raise ConfigError(f"tunnel_gso must be auto, on or off, got {self.tunnel_gso!r}")
        if self.tunnel_gso == "on" and not self.offload:
            raise ConfigError("tunnel GSO needs offload on (TUN TSO super-packets to hand over)")
        tap = self.tap_name
        if not tap or len(tap.encode()) > 15:
            raise ConfigError(f"TAP name must be 1..15 bytes, got {tap!r}")
        name = self.device_name
        if not name or len(name.encode()) > 15:
            raise ConfigError(f"TUN name must be 1..15 bytes, got {name!r}")

    @property
    def device_name(self) -> str:
        return self.tun_name or f"flannel.{self.vni}"

    @property
    def tap_name(self) -> str:
        return self.tunnel_tap_name or f"fltx.{self.vni}"

    @property
    def tx_slots(self) -> int:
        """Packet slots per TUN batch: one UDP GSO run's worth, or one without GSO."""
        return max(1, min(GSO_MAX_SEGS, UDP_MAX // (ENCAP_HLEN + self.mtu))) if self.tx_gso else 1


class Route:
    """What the packet path needs of one tunnelled peer, built once per peer set."""

    __slots__ = ("addr", "ip_bytes", "key", "mac", "mac_text", "net", "partial", "peer",
                 "prefix", "public_ip", "stats")

    def __init__(self, peer: Peer, vtep_mac: bytes, prefix: bytes, port: int,
                 stats: PeerStats) -> None:
        self.peer = peer
        self.key = str(peer.subnet)  # counters, drops and taps name the peer by its subnet
        self.public_ip = str(peer.public_ip)
        self.addr = (self.public_ip, port)  # sendto() address
        self.ip_bytes = peer.public_ip.packed  # the outer destination of tunnel GSO writes
        self.mac = vtep_mac
        self.mac_text = wire.mac_to_str(vtep_mac)
        self.net = int(peer.subnet.network_address)  # the inner-source check
        self.prefix = prefix  # VXLAN + Ethernet header for datagrams to this peer
        self.partial = peer.partial_csum  # peer completes partial TCP checksums
        self.stats = stats


@dataclass(frozen=True)
class _Table:
    """Everything derived from one peer set, swapped as one reference."""

    fib: Fib
    mask: int
    tx: dict[int, Route]  # masked destination -> route
    rx: dict[str, Route]  # peer PublicIP string -> route


def open_devices(config: EngineConfig) -> tuple[TunDevice, UdpEndpoint]:
    """The real TUN device and UDP endpoint for ``config`` (not yet configured)."""
    tun = TunDevice.open(config.device_name, offload=config.offload,
                         multi_queue=config.shared_devices)
    try:
        udp = UdpEndpoint.open(str(config.public_ip), config.port, config.socket_buffer,
                               gro=config.rx_gro or config.offload, gso=True,
                               reuseport=config.shared_devices,
                               source_ports=config.source_ports)
    except BaseException:
        tun.close()
        raise
    return tun, udp


async def open_engine(config: EngineConfig) -> Engine:
    """A started engine on real devices: TUN created and configured, UDP bound."""
    engine = Engine(config)
    await engine.start()
    return engine


class Engine:
    """A userspace VXLAN endpoint on one TUN device and one UDP endpoint."""

    def __init__(self, config: EngineConfig, tun: TunDevice | None = None,
                 udp: UdpEndpoint | None = None) -> None:
        self.config = config
        self._tun = tun
        self._udp = udp
        self._owns_devices = tun is None
        self._vxlan = wire.vxlan_header(config.vni)
        self._own_mac = config.vtep_mac
        self._eth_tail = config.vtep_mac + wire.ETH_P_IP.to_bytes(2, "big")
        self._table = _Table(Fib.build(()), 0xFFFFFFFF, {}, {})
        self._peer_stats: dict[str, PeerStats] = {}
        self._c = Counters()
        self._drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._peer_drops: dict[tuple[str, str, str], int] = {}
        self.recorder = FlightRecorder()
        self._tap: TapHub | None = None
        self._taps = TapHub(time.time_ns)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._txb = TxBatch(config.mtu, config.tx_slots, config.offload)
        self._max_tun = 65535 if config.offload else config.mtu
        self._rxbuf = bytearray(_RX_BUF)
        self._rxview = memoryview(self._rxbuf)
        self._rxbufs = [self._rxview]
        # TSO: segments of one super-packet are cut here, behind the peer's prefix.
        self._segview = memoryview(bytearray(2 * _RX_BUF if config.offload else 0))
        self._gro: gro.Coalescer | None = None
        self._readers: list[int] = []
        self._tunnel: TunnelTx | None = None
        self.tunnel_reason = "off" if config.tunnel_gso == "off" else (
            "needs offload on" if not config.offload else "not started")
        self._own_ip = config.public_ip.packed
        # Set when a device is gone for good (the TUN deleted under us): the loops stop
        # and ``on_failure`` tells the owner, who builds a new engine.
        self.failure: str | None = None
        # Source lanes (the endpoint's, so fakes decide): lane 0 is PublicIP:port.
        self._lanes = 0
        self._lane_ports: list[int] = [config.port]
        self._rx_sport = 0  # the outer source port of the receive being handled (for taps)
        self._busy = config.busy_poll_us / 1e6
        self._spinning = False
        self.on_failure: Callable[[str], None] | None = None

    # ---- lifecycle --------------------------------------------------------------------
    @property
    def source_ports(self) -> tuple[int, ...]:
        """The lanes' outer source ports in lane order (empty: all from ``config.port``)."""
        return tuple(self._lane_ports[1:])

    @property
    def tun_name(self) -> str:
        return self._tun.name if self._tun is not None else self.config.device_name

    async def start(self) -> None:
        """Open (if none were passed in) and configure the devices; register the readers."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        if self._tun is None or self._udp is None:
            self._tun, self._udp = open_devices(cfg)
            try:
                await self._tun.configure(f"{cfg.subnet.network_address}/32", cfg.mtu,
                                          cfg.tun_txqueuelen,
                                          65535 - wire.OVERHEAD - 14 if cfg.offload else None)
                if cfg.offload and cfg.tunnel_gso != "off":
                    await self._start_tunnel()
            except BaseException:
                await self.close()
                raise
        if self._udp.gro:
            self._gro = gro.Coalescer()
        self._lanes = self._udp.lanes - 1
        self._lane_ports = [p or cfg.port for p in self._udp.ports]
        readers = ((self._tun.fileno(), self.tun_readable),
                   (self._udp.fileno(), self.udp_readable))
        for fd, cb in readers:  # fake devices have no descriptor: their tests call the loops
            if fd >= 0:
                self._loop.add_reader(fd, cb)
                self._readers.append(fd)

    async def _start_tunnel(self) -> None:
        """Open the tunnel-GSO TAP, or note why not ("on": that is an error)."""
        cfg = self.config
        reason = host_reason()
        tunnel = None
        if reason is None:
            try:
                tunnel = TunnelTx.open(cfg.tap_name, multi_queue=cfg.shared_devices)
                await tunnel.configure()
            except DeviceError as e:
                if tunnel is not None:
                    tunnel.close()
                tunnel = None
                reason = str(e)
        if tunnel is None:
            if cfg.tunnel_gso == "on":
                raise DeviceError(f"tunnel GSO unavailable: {reason}")
            self.tunnel_reason = f"unavailable: {reason}"
            return
        self.attach_tunnel(tunnel)

    def attach_tunnel(self, tunnel: TunnelTx) -> None:
        """Send TCP super-packets through ``tunnel`` (the kernel segments them)."""
        assert self._tun is not None
        self._tunnel = tunnel
        self.tunnel_reason = f"on ({tunnel.name})"

    @property
    def tx_path(self) -> str:
        """How the tx loop sends, for /status and the bench output."""
        if self._tunnel is not None:
            return "tunnel-gso"
        if self.config.offload:
            return "tso-split+udp-gso"
        return "udp-gso" if self.config.tx_gso else "per-datagram"

    async def close(self) -> None:
        """Unregister the readers; close the devices we opened (closing the TUN deletes it)."""
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        if self._owns_devices:
            if self._tun is not None:
                self._tun.close()
            if self._udp is not None:
                self._udp.close()
            if self._tunnel is not None:
                self._tunnel.close()
                self._tunnel = None

    def _fail(self, reason: str) -> None:
        """A device is gone: stop reading (its descriptor would wake us forever), tell the
        owner once."""
        if self.failure is not None:
            return
        self.failure = reason
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        if self.on_failure is not None:
            self.on_failure(reason)

    # ---- peers and counters -------------------------------------------------------------
    def set_peers(self, peers: Iterable[Peer]) -> None:
        """Replace the whole peer set at once; only Path.VXLAN peers are tunnelled."""
        fib = Fib.build(peers)
        stats: dict[str, PeerStats] = {}
        tx: dict[int, Route] = {}
        rx: dict[str, Route] = {}
        for key, e in fib.entries.items():
            name = str(e.peer.subnet)
            st = stats[name] = self._peer_stats.get(name) or PeerStats()
            route = Route(e.peer, e.vtep_mac, self._vxlan + e.vtep_mac + self._eth_tail,
                          self.config.port, st)
            tx[key] = route
            rx[e.public_ip_str] = route
        self._peer_stats = stats
        self._table = _Table(fib, fib.mask, tx, rx)

    @property
    def fib(self) -> Fib:
        return self._table.fib

    def snapshot(self) -> EngineStats:
        """A frozen copy of every counter."""
        c = self._c.as_dict()
        c["tx_gso_sends"] = self._udp.gso_sends if self._udp is not None else 0
        c["tap_records"] = self._taps.records
        c["tap_records_lost"] = self._taps.lost
        ports = self._lane_ports[1:] or self._lane_ports
        return EngineStats(tx_path=self.tx_path, tunnel_gso=self.tunnel_reason,
            source_ports=",".join(map(str, ports)),
            peers={k: s.freeze() for k, s in self._peer_stats.items()},
            drops={r.value: v for r, v in self._drops.items()},
            peer_drops=dict(self._peer_drops), **c)

    # ---- taps -------------------------------------------------------------------------
    def add_tap(self, sub: TapSubscriber) -> None:
        """Attach a capture/trace; the loops start emitting records at their next batch."""
        self._taps.prune()
        self._taps.subscribers.append(sub)
        self._tap = self._taps

    def remove_tap(self, sub: TapSubscriber) -> None:
        sub.done = True
        self._taps.prune()
        if not self._taps.subscribers:
            self._tap = None

    @property
    def taps_active(self) -> int:
        return sum(1 for s in self._taps.subscribers if not s.done)

    # ---- drops (cold path: counted, recorded, tapped) ------------------------------------
    def _drop(self, reason: DropReason, direction: str, route: Route | None,
              data: bytes | bytearray | memoryview | None, outer_src: str = "",
              count: int = 1) -> None:
        self._drops[reason] += count
        peer = route.key if route is not None else "-"
        key = (reason.value, peer, direction)
        self._peer_drops[key] = self._peer_drops.get(key, 0) + count
        self.recorder.record(time.time_ns(), reason.value, direction,
                             route.key if route is not None else "", outer_src, data, count)
        tap = self._tap
        if tap is not None:
            if direction == TX:
                tap.emit(TX, "dropped", reason.value, "", peer if route else "",
                         route.public_ip if route else "", route.mac_text if route else "",
                         data, None, "", "", 0, 0)
            else:
                tap.emit(RX, "dropped", reason.value, "", peer if route else "",
                         route.public_ip if route else "", route.mac_text if route else "",
                         None, data, outer_src, str(self.config.public_ip), 0,
                         self.config.port)

    # ---- tx: TUN -> UDP -------------------------------------------------------------------
    def tun_readable(self) -> None:
        """The TUN's reader callback: the tx loop, then (busy polling) a short wait for
        the next packet without sleeping."""
        if self._tx() and self._busy and not self._spinning:
            self._spin()

    def udp_readable(self) -> None:
        """The UDP endpoint's reader callback: the rx loop, then (busy polling) a short
        wait for the next packet without sleeping."""
        if self._rx() and self._busy and not self._spinning:
            self._spin()

    def _spin(self) -> None:
        """Busy polling: for up to ``busy_poll_us`` after a wake-up that moved packets,
        poll both devices instead of sleeping; the first that has a packet is drained
        and the loop returns to the event loop (so control-plane tasks are never held up
        by more than one window). A request/response crossing the engine (a ping, an
        RPC) then costs no process wake-up on that side: the reply is caught while we
        still run."""
        self._spinning = True
        try:
            clock = time.perf_counter
            end = clock() + self._busy
            c = self._c
            while clock() < end:
                c.busy_polls += 1
                if self._tx() or self._rx():
                    c.busy_poll_hits += 1
                    return
        finally:
            self._spinning = False

    def _tx(self) -> int:
        """The tx loop: drain the TUN; runs of back-to-back packets to one peer leave in
        one GSO call. Returns the TUN reads it made."""
        tun, b = self._tun, self._txb
        if tun is None:
            return 0
        buf, view = b.buf, b.view
        off, size, csums = b.off, b.size, b.csum
        table = self._table
        tx, mask = table.tx, table.mask
        check, from_bytes, complete = wire.check_tun_packet, int.from_bytes, csum.complete_checksum
        c, maxlen, flush = self._c, self._max_tun, self._flush
        tunnel, gsos = self._tunnel, b.gso
        lanes, lane_of, crc32 = self._lanes, wire.flow_lane, zlib.crc32
        total = 0
        limit = self.config.batch
        while total < limit:
            k = tun.read_batch(b)
            if b.error is not None:
                self._drop(b.error, TX, None, None)
                if tun.last_errno in _GONE:
                    self._fail(f"TUN {tun.name} is gone ({errno.errorcode[tun.last_errno]})")
                    return 0
            for reason, data in b.rejects:
                self._drop(reason, TX, None, data)
            if b.reads == 0:
                break
            total += b.reads
            run: Route | None = None
            first = end = seglen = npk = nby = i0 = rbytes = lane = rlane = 0
            contig = True
            for i in range(k):
                o = off[i]
                plen = size[i]
                ip = o + ENCAP_HLEN
                bad = check(buf, ip, plen, maxlen)
                if bad is not None:
                    self._drop(bad, TX, None, view[ip:ip + max(plen, 0)])
                    continue
                route = tx.get(from_bytes(buf[ip + 16:ip + 20], "big") & mask)
                if route is None:
                    self._unreachable(ip, plen)
                    continue
                if lanes:  # wire.flow_lane, inlined for unfragmented TCP/UDP without options
                    pr = buf[ip + 9]
                    if (buf[ip] == 0x45 and (pr == 6 or pr == 17)
                            and not (buf[ip + 6] & 0x3F | buf[ip + 7])):
                        lane = 1 + crc32(view[ip + 12:ip + 24], pr) % lanes
                    else:
                        lane = lane_of(buf, ip, lanes)
                g = gsos[i]
                if g:  # a TSO super-packet: cut here, or by the kernel after encapsulation
                    if run is not None:
                        flush(run, first, end, seglen, npk, nby, i0, contig, rbytes, rlane)
                        run = None
                    if tunnel is not None and plen + wire.OVERHEAD <= 65535:
                        self._tunnel_send(tunnel, route, o, plen, g, lane)
                    else:
                        self._split_send(route, ip, plen, g, lane)
                    continue
                cs = csums[i]
                if cs:
                    if route.partial:
                        c.tx_csum_partial += 1
                    else:
                        complete(buf, ip, plen, cs >> 8, cs & 0xFF)
                        c.tx_csum_completed += 1
                buf[o:ip] = route.prefix
                dlen = plen + ENCAP_HLEN
                # A run: consecutive packets to one peer from one lane, all of one size
                # (the last may be shorter), at most 64 and 65507 bytes: one UDP GSO
                # call. Full-size packets lie back to back; others go as an iovec.
                if (route is not run or lane != rlane or i != i0 + npk or dlen > seglen
                        or npk == GSO_MAX_SEGS or rbytes + dlen > UDP_MAX):
                    if run is not None:
                        flush(run, first, end, seglen, npk, nby, i0, contig, rbytes, rlane)
                    run, first, seglen, npk, nby, i0, rbytes = route, o, dlen, 0, 0, i, 0
                    rlane = lane
                    contig = True
                elif o != end:
                    contig = False
                end = o + dlen
                npk += 1
                nby += plen
                rbytes += dlen
                if dlen < seglen:  # shorter: the last datagram its run may have
                    flush(run, first, end, seglen, npk, nby, i0, contig, rbytes, rlane)
                    run = None
            if run is not None:
                flush(run, first, end, seglen, npk, nby, i0, contig, rbytes, rlane)
            if b.error is not None or (k < b.nslots and not b.rejects and not self.config.offload):
                break  # drained (or failing): wait for the next wake-up
        if total or not self._spinning:
            c.tun_packets += total
            c.tun_wakeups += 1
            if total > c.tun_max_batch:
                c.tun_max_batch = total
        return total

    def _flush(self, route: Route, first: int, end: int, seglen: int, npk: int, nby: int,
               i0: int, contig: bool, rbytes: int, lane: int) -> None:
        """Send one run (``npk`` datagrams, ``nby`` inner bytes) from ``lane``; count what
        left."""
        assert self._udp is not None
        b = self._txb
        if contig:
            sent, nbytes = self._udp.send_run(b.view[first:end], seglen, route.addr, lane)
        else:
            view, off, size = b.view, b.off, b.size
            sent, nbytes = self._udp.send_parts(
                [view[off[k]:off[k] + ENCAP_HLEN + size[k]] for k in range(i0, i0 + npk)],
                seglen, rbytes, route.addr, lane)
        st = route.stats
        if sent == npk:
            st.tx_packets += npk
            st.tx_bytes += nby
        else:
            st.tx_packets += sent
            st.tx_bytes += nbytes - sent * ENCAP_HLEN
            self._drop(DropReason.SEND_FAILED, TX, route, None, count=npk - sent)
        tap = self._tap
        if tap is not None:
            self._tap_run(tap, route, i0, npk, sent == npk, seglen, self._lane_ports[lane])

    def _split_send(self, route: Route, ip: int, plen: int, mss: int, lane: int) -> None:
        """Cut a TSO super-packet into MSS segments behind the peer's prefix (full TCP
        checksums, or pseudo-header sums for a flannelette peer); one GSO send."""
        assert self._udp is not None
        view = self._txb.view
        used, segs, seglen = tso.tso_split(view, ip, plen, mss, self._segview, route.prefix,
                                           route.partial)
        c = self._c
        c.tso_splits += 1
        c.tso_segments += segs
        if route.partial:
            c.tx_csum_partial += segs
        else:
            c.tx_csum_completed += segs
        sent, nbytes = self._udp.send_run(self._segview[:used], seglen, route.addr, lane)
        st = route.stats
        st.tx_packets += sent
        st.tx_bytes += nbytes - sent * ENCAP_HLEN
        if sent != segs:
            self._drop(DropReason.SEND_FAILED, TX, route, view[ip:ip + plen], count=segs - sent)
        tap = self._tap
        if tap is not None:
            rule = (f"TSO split into {segs} segments of MSS {mss}, inner checksums "
                    + ("left partial (flannelette peer)" if route.partial else "completed"))
            me, port, sv = str(self.config.public_ip), self.config.port, self._segview
            sport = self._lane_ports[lane]
            for k in range(segs):
                o = k * seglen
                d = sv[o:min(o + seglen, used)]
                tap.emit(TX, "forwarded" if sent == segs else "dropped",
                         "" if sent == segs else DropReason.SEND_FAILED.value, rule, route.key,
                         route.public_ip, route.mac_text, d[ENCAP_HLEN:], d, me,
                         route.public_ip, sport, port)

    def _tunnel_send(self, tunnel: TunnelTx, route: Route, o: int, plen: int,
                     mss: int, lane: int) -> None:
        """One TCP super-packet, wrapped once, written to the tunnel-GSO TAP (from the
        source port of the flow's lane, as its other packets)."""
        view = self._txb.view
        ip = o + ENCAP_HLEN
        inner = view[ip:ip + plen]
        cfg = self.config
        hdr = tunnel.header(inner, mss, self._own_ip, route.ip_bytes, route.mac, self._own_mac,
                            cfg.vni, self._lane_ports[lane], cfg.port)
        ihl = (view[ip] & 0x0F) << 2
        hl = ihl + ((view[ip + ihl + 12] >> 4) << 2)
        segs = max(1, -(-(plen - hl) // mss))
        if not tunnel.write([hdr, inner]):
            self._drop(DropReason.TUN_WRITE_FAILED, TX, route, inner, count=segs)
            return
        st = route.stats
        st.tx_packets += segs
        st.tx_bytes += plen + (segs - 1) * hl
        c = self._c
        c.tunnel_gso_writes += 1
        c.tunnel_gso_segments += segs
        tap = self._tap
        if tap is not None:
            tap.emit(TX, "forwarded", "", f"kernel tunnel GSO: one write, {segs} segments of "
                     f"MSS {mss}", route.key, route.public_ip, route.mac_text, inner,
                     hdr[-ENCAP_HLEN:] + bytes(inner), str(cfg.public_ip), route.public_ip,
                     int.from_bytes(hdr[-ENCAP_HLEN - 8:-ENCAP_HLEN - 6], "big"), cfg.port)

    def _tap_run(self, tap: TapHub, route: Route, i0: int, npk: int, ok: bool,
                 seglen: int, sport: int) -> None:
        b = self._txb
        view, port, me = b.view, self.config.port, str(self.config.public_ip)
        rule = f"UDP GSO send of {npk} datagrams of {seglen} bytes" if npk > 1 else ""
        for i in range(i0, i0 + npk):
            o, plen = b.off[i], b.size[i]
            cs = b.csum[i]
            r = rule
            if cs:
                r = ("inner checksum left partial (flannelette peer)" if route.partial
                     else "inner checksum completed") + (f"; {rule}" if rule else "")
            inner = view[o + ENCAP_HLEN:o + ENCAP_HLEN + plen]
            outer = view[o:o + ENCAP_HLEN + plen]
            if ok:
                tap.emit(TX, "forwarded", "", r, route.key, route.public_ip, route.mac_text,
                         inner, outer, me, route.public_ip, sport, port)
            else:
                tap.emit(TX, "dropped", DropReason.SEND_FAILED.value, r, route.key,
                         route.public_ip, route.mac_text, inner, outer, me, route.public_ip,
                         sport, port)

    def _unreachable(self, ip: int, plen: int) -> None:
        """No peer owns the destination: count it and answer ICMP host unreachable.

        The error comes from the address a VTEP for the destination's subnet would
        have (its network address), not from our TUN address: the kernel drops
        packets arriving with one of its own addresses as source.
        """
        view = self._txb.view
        packet = view[ip:ip + plen]
        self._drop(DropReason.NO_ROUTE, TX, None, packet)
        dst = int.from_bytes(view[ip + 16:ip + 20], "big") & self._table.mask
        reply = wire.icmp_unreachable(packet, dst.to_bytes(4, "big"))
        if reply is None or self._tun is None:
            return
        if self._tun.write(_ZERO_VNET + reply):
            self._c.icmp_unreachable += 1
        else:
            self._drop(DropReason.TUN_WRITE_FAILED, RX, None, reply)

    # ---- rx: UDP -> TUN ---------------------------------------------------------------------
    def _rx(self) -> int:
        """The rx loop: drain the UDP endpoint; each datagram checked, then merged or
        written alone. Returns the receives that had data."""
        udp, tun = self._udp, self._tun
        if udp is None or tun is None:
            return 0
        coalescer = self._gro
        buf, view, bufs = self._rxbuf, self._rxview, self._rxbufs
        table = self._table
        rx, mask = table.rx, table.mask
        recv, check, write_one = udp.recv, wire.check_frame, self._write_one
        from_bytes = int.from_bytes
        vx, own, mtu, c = self._vxlan, self._own_mac, self.config.mtu, self._c
        spoof = self.config.check_inner_source
        tap = self._tap
        count = 0
        limit = self.config.batch
        while count < limit:
            n, step, src, sport = recv(bufs)
            if n < 0:
                if n == -2:
                    self._drop(DropReason.UDP_RECV_FAILED, RX, None, None)
                break
            count += 1
            if tap is not None:
                self._rx_sport = sport
            # A kernel VXLAN sender's ~64 KB datagram carries its inner MSS as the GRO
            # segment size: one frame, not a batch (its IP length covers it all).
            if step != n and n > OFF_IP + 4 and OFF_IP + ((buf[24] << 8) | buf[25]) >= n:
                step = n
            route = rx.get(src)
            known = route is not None
            held = held_by = 0  # segments (and their inner bytes) in the coalescer
            off = 0
            while off < n or off == 0:  # once at least: an empty datagram is counted too
                seg_n = step if off + step <= n else n - off
                seg = view[off:off + seg_n] if step != n else view
                off += step or 1
                verdict = check(seg, seg_n, vx, own, mtu, known)
                if verdict is Frame.IPV4:
                    assert route is not None  # check_frame refuses unknown sources
                    if spoof and from_bytes(seg[34:38], "big") & mask != route.net:
                        self._drop(DropReason.SPOOFED_INNER_SOURCE, RX, route, seg[:seg_n],
                                   src)
                        continue
                    ip_len = (seg[24] << 8) | seg[25]
                    if coalescer is None:
                        write_one(route, seg, ip_len, src)
                        continue
                    if held and coalescer.append(seg, OFF_IP, ip_len):
                        held += 1
                        held_by += ip_len
                        if tap is not None:
                            self._tap_rx(tap, route, seg[:OFF_IP + ip_len], src, -1, 0)
                    else:
                        if held:
                            self._write_held(route, held, held_by, src)
                            held = held_by = 0
                        if not coalescer.can_hold(seg, OFF_IP, ip_len, mtu):
                            write_one(route, seg, ip_len, src)
                            continue
                        coalescer.start(seg, OFF_IP, ip_len)
                        held, held_by = 1, ip_len
                        if tap is not None:
                            self._tap_rx(tap, route, seg[:OFF_IP + ip_len], src, -1, 0)
                    if off < n:  # the rest of the GRO batch: same flow, few comparisons
                        start = off
                        off, taken, nbytes = coalescer.extend(view, off, n, step,
                                                              bytes(seg[:OFF_IP]))
                        held += taken
                        held_by += nbytes
                        if taken and tap is not None:
                            for s in range(start, off, step):
                                d = view[s:s + step]
                                self._tap_rx(tap, route, d[:OFF_IP + ((d[24] << 8) | d[25])],
                                             src, -1, 0)
                elif verdict is Frame.ARP:
                    self._arp(seg, seg_n, src, route)
                else:
                    self._drop(verdict, RX, route, seg[:seg_n], src)
            if held:
                self._write_held(route, held, held_by, src)
        if count or not self._spinning:
            c.udp_packets += count
            c.udp_wakeups += 1
            if count > c.udp_max_batch:
                c.udp_max_batch = count
        return count

    def _write_one(self, route: Route, seg: memoryview, ip_len: int, src: str) -> None:
        """One received packet to the TUN, its vnet header written over the VXLAN and
        Ethernet bytes in front of it (a tap copies the datagram first)."""
        assert self._tun is not None
        tap = self._tap
        pre = bytes(seg[:OFF_IP + ip_len]) if tap is not None else b""
        kind = vnet.fill_rx_vnet_hdr(seg, HEAD, OFF_IP, ip_len, self.config.mtu)
        if self._tun.write(seg[HEAD:OFF_IP + ip_len]):
            self._count_rx(route, 1, ip_len, kind, seg)
            if tap is not None:
                self._tap_rx(tap, route, memoryview(pre), src, kind, 1)
        else:
            self._drop(DropReason.TUN_WRITE_FAILED, RX, route, seg[:OFF_IP + ip_len], src)

    def _count_rx(self, route: Route, npk: int, nby: int, kind: int,
                  seg: memoryview | None = None) -> None:
        """Peer counters in inner-packet units: an unsegmented TCP datagram (a kernel or
        tunnel-GSO sender's ~64 KB) counts as the MSS segments the TUN cuts it into."""
        st = route.stats
        if kind == vnet.RX_CSUM_PARTIAL:
            self._c.rx_csum_partial += 1
        elif kind == vnet.RX_GSO:
            self._c.rx_gso += 1
            if seg is not None:
                ihl = (seg[OFF_IP] & 0x0F) << 2
                hl = ihl + ((seg[OFF_IP + ihl + 12] >> 4) << 2)
                mss = self.config.mtu - hl
                if mss > 0 and nby > hl:
                    npk = -(-(nby - hl) // mss)
                    nby += (npk - 1) * hl
        st.rx_packets += npk
        st.rx_bytes += nby

    def _write_held(self, route: Route | None, npk: int, nby: int, src: str) -> None:
        """Write the coalescer's packet (``npk`` segments merged) to the TUN."""
        assert self._gro is not None and self._tun is not None and route is not None
        packet = self._gro.finish(self.config.mtu)
        if not self._tun.write(packet):
            if packet[1] == vnet.GSO_UDP_L4:  # this kernel's TUN takes no UDP GSO: stop it
                self._gro.udp = False
            self._drop(DropReason.TUN_WRITE_FAILED, RX, route, packet[vnet.VNET_HDR_LEN:], src,
                       count=npk)
            return
        if packet[1] != vnet.GSO_NONE:  # TCPV4 or UDP_L4: the kernel cuts it
            kind = vnet.RX_GSO
            self._c.rx_gro_merged += npk
        elif packet[0] & vnet.F_NEEDS_CSUM:
            kind = vnet.RX_CSUM_PARTIAL
        else:
            kind = vnet.RX_PLAIN
        self._count_rx(route, npk, nby, kind)
        tap = self._tap
        if tap is not None and npk > 1:
            tap.emit(RX, "forwarded", "", f"GRO merged {npk} segments into one TUN write",
                     route.key, route.public_ip, route.mac_text,
                     packet[vnet.VNET_HDR_LEN:], None, src, str(self.config.public_ip),
                     self._rx_sport,
                     self.config.port)

    def _tap_rx(self, tap: TapHub, route: Route, datagram: memoryview, src: str, kind: int,
                _n: int) -> None:
        """One received datagram's record; ``kind`` -1: held for GRO (merged record follows)."""
        rule = {vnet.RX_CSUM_PARTIAL: "partial inner checksum: written with NEEDS_CSUM",
                vnet.RX_GSO: "unsegmented TCP super-packet: written with GSO_TCPV4",
                -1: "held for GRO"}.get(kind, "")
        tap.emit(RX, "forwarded", "", rule, route.key, route.public_ip, route.mac_text,
                 datagram[OFF_IP:], datagram, src, str(self.config.public_ip), self._rx_sport,
                 self.config.port)

    def _arp(self, seg: memoryview, n: int, src: str, route: Route | None) -> None:
        """Answer an ARP request for an address of our subnet (kernel peers w/o neighbour)."""
        answer = wire.arp_answer(self._vxlan, self._own_mac, self.config.subnet,
                                 bytes(seg[OFF_IP:n]))
        if isinstance(answer, DropReason):
            self._drop(answer, RX, route, seg[:n], src)
            return
        assert self._udp is not None
        if self._udp.send(answer, (src, self.config.port)):
            self._c.arp_replies += 1
        else:
            self._drop(DropReason.SEND_FAILED, TX, route, answer)
