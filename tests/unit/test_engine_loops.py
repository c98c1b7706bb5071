"""The engine's tx and rx loops on fake devices: routing, runs, checksums, counters, drops.

No root: tests/devices.py replaces only the system calls; scapy is the
independent checker of every byte the engine writes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from dataplane import tap as tapmod
from dataplane import tunnel_gso, vnet, wire
from dataplane.bpf import compile_filter
from dataplane.csum import pseudo_header_sum
from dataplane.engine import Engine, EngineConfig
from dataplane.fib import Peer
from dataplane.tap import TapFilter, TapSubscriber
from tests.devices import FakeTun, FakeTunnel, FakeUdp

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
KERNEL_MAC = bytes.fromhex("0a0000000002")
FL_MAC = bytes.fromhex("0a0000000003")
KERNEL = Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), KERNEL_MAC)
FLANNELETTE = Peer(NET("10.244.3.0/24"), ADDR("10.10.1.3"), FL_MAC, partial_csum=True)
MTU = 1450


def engine(*, offload: bool = False, gro: bool = True, tx_gso: bool = True,
           check_inner_source: bool = True, lanes: int = 0) -> tuple[Engine, FakeTun, FakeUdp]:
    tun, udp = FakeTun(offload=offload), FakeUdp(gro=gro, lanes=lanes)
    e = Engine(EngineConfig(NET("10.244.1.0/24"), ADDR("10.10.1.1"), OWN_MAC, mtu=MTU,
                            offload=offload, tx_gso=tx_gso,
                            check_inner_source=check_inner_source), tun, udp)
    asyncio.run(e.start())
    e.set_peers([KERNEL, FLANNELETTE])
    return e, tun, udp


def icmp(src: str = "10.244.1.2", dst: str = "10.244.2.2", size: int = 56) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP() / (b"x" * size))


def tcp(src: str = "10.244.1.2", dst: str = "10.244.2.2", payload: int = 1398, seq: int = 1000,
        flags: str = "A") -> bytes:
    return bytes(IP(src=src, dst=dst, id=7) / TCP(sport=5000, dport=80, seq=seq, ack=1,
                                                  flags=flags, options=[("NOP", None)] * 12)
                 / (b"p" * payload))


def vxlan(inner: bytes, src_mac: bytes = KERNEL_MAC, dst_mac: bytes = OWN_MAC) -> bytes:
    return wire.build_frame(1, dst_mac, src_mac, inner)


def decode(sent: bytes) -> Ether:
    return Ether(sent[8:])


# ---- tx ------------------------------------------------------------------------------------
def test_tx_wraps_a_packet_for_its_peer_and_counts_after_the_send() -> None:
    e, tun, udp = engine()
    pkt = icmp()
    tun.queue_packet(pkt)
    e.tun_readable()
    assert len(udp.sent) == 1
    out = udp.sent[0]
    assert out.addr == ("10.10.1.2", 8472)
    v = VXLAN(out.data)
    assert v.vni == 1 and v.flags == 0x08
    eth = decode(out.data)
    assert (eth.dst, eth.src) == (wire.mac_to_str(KERNEL_MAC), wire.mac_to_str(OWN_MAC))
    assert bytes(eth.payload) == pkt
    snap = e.snapshot()
    assert snap.peers["10.244.2.0/24"].tx_packets == 1
    assert snap.peers["10.244.2.0/24"].tx_bytes == len(pkt)
    assert snap.tun_packets == 1 and snap.total_drops == 0


def test_tx_full_size_packets_to_one_peer_leave_in_one_gso_call() -> None:
    e, tun, udp = engine()
    for i in range(5):
        tun.queue_packet(tcp(seq=1000 + i * 1398))
    tun.queue_packet(tcp(payload=100, seq=1000 + 5 * 1398))  # shorter: ends the run
    tun.queue_packet(tcp(dst="10.244.3.9"))  # another peer: another run
    e.tun_readable()
    calls = [s.gso_call for s in udp.sent]
    assert calls[:6] == [1] * 6 and calls[6] == 0  # one GSO call of 6, then one sendto
    assert [len(s.data) for s in udp.sent[:6]] == [22 + 1450] * 5 + [22 + 1450 - 1298]
    assert udp.sent[6].addr[0] == "10.10.1.3"
    snap = e.snapshot()
    assert snap.peers["10.244.2.0/24"].tx_packets == 6
    assert snap.peers["10.244.3.0/24"].tx_packets == 1
    assert snap.tx_gso_sends == 1


def test_tx_without_gso_sends_one_datagram_per_call() -> None:
    e, tun, udp = engine(tx_gso=False)
    for i in range(3):
        tun.queue_packet(tcp(seq=i * 1398))
    e.tun_readable()
    assert [s.gso_call for s in udp.sent] == [0, 0, 0]
    assert e.snapshot().tun_packets == 3


def test_tx_gso_refused_falls_back_per_datagram_for_good() -> None:
    e, tun, udp = engine()
    udp.refuse_gso = True
    for i in range(4):
        tun.queue_packet(tcp(seq=i * 1398))
    e.tun_readable()
    assert len(udp.sent) == 4 and all(s.gso_call == 0 for s in udp.sent)
    assert udp.gso is False
    assert e.snapshot().peers["10.244.2.0/24"].tx_packets == 4


def test_tx_no_route_answers_icmp_unreachable_and_keeps_the_packet() -> None:
    e, tun, udp = engine()
    pkt = icmp(dst="10.244.9.9")
    tun.queue_packet(pkt)
    e.tun_readable()
    assert not udp.sent
    assert len(tun.written) == 1
    reply = IP(tun.written[0][vnet.VNET_HDR_LEN:])
    assert reply[ICMP].type == 3 and reply[ICMP].code == 1 and reply.src == "10.244.9.0"
    snap = e.snapshot()
    assert snap.drops["no_route"] == 1 and snap.icmp_unreachable == 1
    assert snap.peer_drops == {("no_route", "-", "tx"): 1}
    (rec,) = e.recorder.records("no_route")
    assert rec.data == pkt and rec.direction == "tx"


def test_tx_send_failure_is_a_drop_and_no_tx_count() -> None:
    e, tun, udp = engine()
    udp.fail_sends = True
    tun.queue_packet(icmp())
    e.tun_readable()
    snap = e.snapshot()
    assert snap.drops["send_failed"] == 1
    assert snap.peers["10.244.2.0/24"].tx_packets == 0
    assert snap.peer_drops[("send_failed", "10.244.2.0/24", "tx")] == 1


def test_tx_read_error_is_counted_under_its_own_reason() -> None:
    e, tun, _ = engine()
    tun.inbound.append(OSError(errno.EIO, "boom"))
    e.tun_readable()
    assert e.snapshot().drops["tun_read_failed"] == 1


def test_tx_non_ipv4_from_tun_is_dropped() -> None:
    e, tun, udp = engine()
    tun.queue_packet(b"\x60" + bytes(39))
    e.tun_readable()
    assert not udp.sent and e.snapshot().drops["not_ipv4"] == 1


def _super_packet(dst: str, payload: int = 8000) -> tuple[bytes, bytes]:
    pkt = tcp(dst=dst, payload=payload, flags="PA")
    ihl = 20
    hdr = vnet.VnetHdr(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 0, 1000, ihl, 16).pack()
    # the TUN hands the TCP checksum as the pseudo-header sum (CHECKSUM_PARTIAL)
    raw = bytearray(pkt)
    ps = pseudo_header_sum(raw, 0, 6, len(raw) - ihl)
    struct.pack_into("!H", raw, ihl + 16, ps)
    return hdr, bytes(raw)


def test_tso_super_packet_is_cut_with_full_checksums_for_a_kernel_peer() -> None:
    e, tun, udp = engine(offload=True)
    hdr, pkt = _super_packet("10.244.2.2")
    tun.queue_packet(pkt, hdr)
    e.tun_readable()
    segs = [decode(s.data)[IP] for s in udp.sent]
    assert len(segs) == 8
    payload = b"".join(bytes(s[TCP].payload) for s in segs)
    assert payload == b"p" * 8000
    for s in segs:  # scapy recomputes: the checksums we wrote must equal its own
        again = IP(bytes(s))
        del again.chksum
        del again[TCP].chksum
        again = IP(bytes(again))
        assert (s.chksum, s[TCP].chksum) == (again.chksum, again[TCP].chksum)
    assert [s[TCP].flags.P for s in segs] == [False] * 7 + [True]
    snap = e.snapshot()
    assert (snap.tso_splits, snap.tso_segments, snap.tx_csum_completed) == (1, 8, 8)
    assert all(s.gso_call == 1 for s in udp.sent)


def test_tso_segments_to_a_flannelette_peer_keep_partial_checksums() -> None:
    e, tun, udp = engine(offload=True)
    hdr, pkt = _super_packet("10.244.3.2")
    tun.queue_packet(pkt, hdr)
    e.tun_readable()
    for s in udp.sent:
        ip = s.data[22:]
        field = struct.unpack_from("!H", ip, 36)[0]
        assert field == pseudo_header_sum(ip, 0, 6, len(ip) - 20)
    assert e.snapshot().tx_csum_partial == 8


def test_tso_unsupported_gso_type_is_named() -> None:
    e, tun, udp = engine(offload=True)
    hdr = vnet.VnetHdr(0, vnet.GSO_UDP_L4, 0, 1000, 20, 6).pack()
    tun.queue_packet(bytes(IP(dst="10.244.2.2") / UDP() / (b"u" * 3000)), hdr)
    e.tun_readable()
    assert not udp.sent and e.snapshot().drops["unsupported_gso"] == 1


# ---- rx ------------------------------------------------------------------------------------
def test_rx_writes_the_inner_packet_with_a_vnet_header() -> None:
    e, tun, udp = engine()
    pkt = icmp(src="10.244.2.2", dst="10.244.1.2")
    udp.queue(vxlan(pkt), "10.10.1.2")
    e.udp_readable()
    assert tun.written == [bytes(vnet.VNET_HDR_LEN) + pkt]
    snap = e.snapshot()
    assert snap.peers["10.244.2.0/24"].rx_packets == 1
    assert snap.peers["10.244.2.0/24"].rx_bytes == len(pkt)


@pytest.mark.parametrize("gro", [True, False])
def test_rx_drop_reasons_are_counted_and_recorded(gro: bool) -> None:
    e, tun, udp = engine(gro=gro)
    good = icmp(src="10.244.2.2", dst="10.244.1.2")
    udp.queue(vxlan(good), "10.10.9.9")  # no peer's PublicIP
    udp.queue(b"\x0c" + vxlan(good)[1:], "10.10.1.2")  # bad VXLAN flags
    udp.queue(vxlan(good)[:30], "10.10.1.2")  # truncated inner IPv4
    udp.queue(vxlan(icmp(src="10.244.7.7", dst="10.244.1.2")), "10.10.1.2")  # spoofed
    e.udp_readable()
    assert not tun.written
    snap = e.snapshot()
    for reason in ("unknown_peer", "bad_flags", "truncated", "spoofed_inner_source"):
        assert snap.drops[reason] == 1, reason
    assert snap.peer_drops[("spoofed_inner_source", "10.244.2.0/24", "rx")] == 1
    assert snap.peer_drops[("unknown_peer", "-", "rx")] == 1
    (rec,) = e.recorder.records("unknown_peer")
    assert rec.outer_src == "10.10.9.9" and rec.data == vxlan(good)


def test_rx_inner_source_check_can_be_relaxed() -> None:
    e, tun, udp = engine(check_inner_source=False)
    udp.queue(vxlan(icmp(src="10.244.7.7", dst="10.244.1.2")), "10.10.1.2")
    e.udp_readable()
    assert len(tun.written) == 1 and e.snapshot().total_drops == 0


def test_rx_a_gro_batch_of_one_flow_becomes_one_tun_write() -> None:
    e, tun, udp = engine()
    segs = [vxlan(tcp(src="10.244.2.2", dst="10.244.1.2", seq=1000 + i * 1398))
            for i in range(6)]
    udp.queue_gro(segs, "10.10.1.2")
    e.udp_readable()
    assert len(tun.written) == 1
    hdr = vnet.VnetHdr.parse(tun.written[0])
    assert hdr.gso_type == vnet.GSO_TCPV4 and hdr.gso_size == 1398
    merged = IP(tun.written[0][vnet.VNET_HDR_LEN:])
    assert len(bytes(merged[TCP].payload)) == 6 * 1398
    snap = e.snapshot()
    assert snap.peers["10.244.2.0/24"].rx_packets == 6
    assert (snap.rx_gso, snap.rx_gro_merged) == (1, 6)


def test_rx_spoofed_segment_inside_a_gro_batch_is_not_merged() -> None:
    e, _, udp = engine()
    segs = [vxlan(tcp(src="10.244.2.2", dst="10.244.1.2", seq=1000 + i * 1398))
            for i in range(3)]
    segs.append(vxlan(tcp(src="10.244.8.8", dst="10.244.1.2", seq=1000 + 3 * 1398)))
    udp.queue_gro(segs, "10.10.1.2")
    e.udp_readable()
    assert e.snapshot().drops["spoofed_inner_source"] == 1
    assert e.snapshot().peers["10.244.2.0/24"].rx_packets == 3


def test_rx_tun_write_failure_counts_a_drop_not_a_packet() -> None:
    e, tun, udp = engine()
    tun.fail_writes = True
    udp.queue(vxlan(icmp(src="10.244.2.2", dst="10.244.1.2")), "10.10.1.2")
    e.udp_readable()
    snap = e.snapshot()
    assert snap.drops["tun_write_failed"] == 1
    assert snap.peers["10.244.2.0/24"].rx_packets == 0


def test_rx_recv_error_is_counted() -> None:
    e, _, udp = engine()
    udp.inbound.append(OSError(errno.ENOMEM, "boom"))
    e.udp_readable()
    assert e.snapshot().drops["udp_recv_failed"] == 1


def test_rx_arp_request_for_our_subnet_is_answered() -> None:
    e, _, udp = engine()
    req = bytes(ARP(op=1, hwsrc=wire.mac_to_str(KERNEL_MAC), psrc="10.244.2.0",
                    pdst="10.244.1.0"))
    udp.queue(wire.build_frame(1, wire.BROADCAST_MAC, KERNEL_MAC, req, wire.ETH_P_ARP),
              "10.10.1.2")
    e.udp_readable()
    (reply,) = udp.sent
    arp = decode(reply.data)[ARP]
    assert arp.op == 2 and arp.hwsrc == wire.mac_to_str(OWN_MAC) and arp.psrc == "10.244.1.0"
    assert e.snapshot().arp_replies == 1


# ---- taps ----------------------------------------------------------------------------------
def test_taps_off_record_nothing() -> None:
    e, tun, udp = engine()
    tun.queue_packet(icmp())
    udp.queue(vxlan(icmp(src="10.244.2.2", dst="10.244.1.2")), "10.10.1.2")
    e.tun_readable()
    e.udp_readable()
    snap = e.snapshot()
    assert (snap.tap_records, snap.tap_records_lost) == (0, 0) and e.taps_active == 0


def test_tap_records_verdicts_peers_and_rules_both_ways() -> None:
    e, tun, udp = engine()
    sub = TapSubscriber(TapFilter())
    e.add_tap(sub)
    tun.queue_packet(icmp())
    tun.queue_packet(icmp(dst="10.244.9.9"))
    udp.queue(vxlan(icmp(src="10.244.2.2", dst="10.244.1.2")), "10.10.1.2")
    udp.queue(vxlan(icmp(src="10.244.2.2", dst="10.244.1.2")), "10.10.9.9")
    e.tun_readable()
    e.udp_readable()
    recs = sub.drain()
    got = [(r.direction, r.verdict, r.reason, r.peer) for r in recs]
    assert ("tx", "forwarded", "", "10.244.2.0/24") in got
    assert ("tx", "dropped", "no_route", "") in got
    assert ("rx", "forwarded", "", "10.244.2.0/24") in got
    assert ("rx", "dropped", "unknown_peer", "") in got
    fwd = next(r for r in recs if r.direction == "tx" and r.verdict == "forwarded")
    assert fwd.inner == icmp() and fwd.outer is not None and fwd.outer[22:] == icmp()
    assert "VtepMAC 0a:00:00:00:00:02" in fwd.comment()
    assert len({r.packet_id for r in recs}) == len(recs)
    e.remove_tap(sub)
    assert e.taps_active == 0


def test_tap_filters_and_count_bound() -> None:
    e, tun, _ = engine()
    sub = TapSubscriber(TapFilter(verdict="dropped"), count=2)
    e.add_tap(sub)
    for i in range(5):
        tun.queue_packet(icmp(dst=f"10.244.9.{i + 1}"))
    tun.queue_packet(icmp())
    e.tun_readable()
    recs = sub.drain()
    assert [r.reason for r in recs] == ["no_route", "no_route"] and sub.done


def test_tap_pcap_filter_on_the_inner_packet() -> None:
    prog = compile_filter("tcp port 80")
    e, tun, _ = engine()
    sub = TapSubscriber(TapFilter(match_inner=prog.match))
    e.add_tap(sub)
    tun.queue_packet(icmp())
    tun.queue_packet(tcp(payload=10))
    e.tun_readable()
    recs = sub.drain()
    assert len(recs) == 1 and recs[0].inner is not None and IP(recs[0].inner).haslayer(TCP)


def test_tap_that_cannot_keep_up_loses_records_not_traffic() -> None:
    e, tun, udp = engine()
    sub = TapSubscriber(TapFilter())
    e.add_tap(sub)
    n = tapmod.QUEUE_RECORDS + 10
    pkt = icmp()
    for _ in range(n // 200 + 1):
        for _ in range(200):
            tun.queue_packet(pkt)
        e.tun_readable()
    sent = len(udp.sent)
    snap = e.snapshot()
    assert sent == (n // 200 + 1) * 200
    assert snap.tap_records == tapmod.QUEUE_RECORDS
    assert snap.tap_records_lost == sent - tapmod.QUEUE_RECORDS


def test_recorder_rings_are_bounded_per_reason() -> None:
    e, tun, _ = engine()
    pkts = [icmp(dst=f"10.244.9.{i + 1}") for i in range(40)]
    for _ in range(3):
        for p in pkts:
            tun.queue_packet(p)
        e.tun_readable()
    assert e.snapshot().drops["no_route"] == 120
    recs = e.recorder.records("no_route")
    assert len(recs) == e.recorder.per_reason == 32
    assert IP(recs[-1].data).dst == "10.244.9.40"


# ---- tunnel GSO ----------------------------------------------------------------------------
def test_tunnel_gso_hands_a_super_packet_over_in_one_write() -> None:
    e, tun, udp = engine(offload=True, lanes=4)
    tap = FakeTunnel()
    e.attach_tunnel(tap)
    hdr, pkt = _super_packet("10.244.2.2")
    tun.queue_packet(pkt, hdr)
    tun.queue_packet(icmp())  # not GSO: the UDP socket as before
    e.tun_readable()
    (head, inner), = tap.written
    assert inner == pkt  # untouched: the kernel cuts and checksums it
    h = tunnel_gso.parse_tunnel_vnet_hdr(head)
    assert h["gso_size"] == 1000 and h["outer_th_offset"] == 34 and h["inner_nh_offset"] == 64
    frame = Ether(head[tunnel_gso.VNET_HDR_TNL_LEN:] + inner)
    assert frame.dst == frame.src == wire.mac_to_str(tap.mac)
    outer = frame[IP]
    assert (outer.src, outer.dst, outer.ttl) == ("10.10.1.1", "10.10.1.2", 65)
    # from the source port of the flow's lane (the fake's lane k sends from 40000 + k)
    assert outer[UDP].dport == 8472
    assert outer[UDP].sport == 40000 + wire.flow_lane(pkt, 0, 4)
    assert outer[VXLAN].vni == 1
    assert (outer[VXLAN].payload.dst, outer[VXLAN].payload.src) == (
        wire.mac_to_str(KERNEL_MAC), wire.mac_to_str(OWN_MAC))
    assert len(udp.sent) == 1  # the ICMP packet
    snap = e.snapshot()
    assert (snap.tunnel_gso_writes, snap.tunnel_gso_segments, snap.tso_splits) == (1, 8, 0)
    assert snap.peers["10.244.2.0/24"].tx_packets == 9
    assert snap.tx_path == "tunnel-gso"


def test_tunnel_gso_write_failure_is_a_drop() -> None:
    e, tun, _ = engine(offload=True)
    tap = FakeTunnel()
    tap.fail_writes = True
    e.attach_tunnel(tap)
    hdr, pkt = _super_packet("10.244.2.2")
    tun.queue_packet(pkt, hdr)
    e.tun_readable()
    snap = e.snapshot()
    assert snap.drops["tun_write_failed"] == 8 and snap.peers["10.244.2.0/24"].tx_packets == 0


def udp_dgram(src: str = "10.244.2.2", dst: str = "10.244.1.2", payload: bytes = b"u" * 1400,
              sport: int = 4000) -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=5201) / payload)


def test_rx_a_gro_batch_of_udp_datagrams_of_one_flow_becomes_one_udp_gso_write() -> None:
    e, tun, udp = engine()
    payloads = [bytes([65 + i]) * 1400 for i in range(5)] + [b"z" * 300]
    udp.queue_gro([vxlan(udp_dgram(payload=p)) for p in payloads], "10.10.1.2")
    e.udp_readable()
    (written,) = tun.written
    hdr = vnet.VnetHdr.parse(written)
    assert (hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == (
        vnet.GSO_UDP_L4, 1400, 20, 6)
    merged = IP(written[vnet.VNET_HDR_LEN:])
    assert bytes(merged[UDP].payload) == b"".join(payloads)
    assert merged[UDP].len == 8 + len(b"".join(payloads))
    assert merged[UDP].chksum == pseudo_header_sum(written[vnet.VNET_HDR_LEN:], 0, 17,
                                                   merged[UDP].len)
    again = IP(bytes(merged))
    del again.chksum
    assert IP(bytes(again)).chksum == merged.chksum
    snap = e.snapshot()
    assert snap.peers["10.244.2.0/24"].rx_packets == 6 and snap.rx_gro_merged == 6


def test_rx_udp_datagrams_of_two_flows_are_not_merged() -> None:
    e, tun, udp = engine()
    udp.queue_gro([vxlan(udp_dgram(sport=4000)), vxlan(udp_dgram(sport=4001))], "10.10.1.2")
    e.udp_readable()
    assert len(tun.written) == 2 and all(
        vnet.VnetHdr.parse(w).gso_type == vnet.GSO_NONE for w in tun.written)


def test_rx_udp_gso_refused_by_the_tun_turns_udp_merging_off() -> None:
    e, tun, udp = engine()
    tun.fail_writes = True
    udp.queue_gro([vxlan(udp_dgram()) for _ in range(3)], "10.10.1.2")
    e.udp_readable()
    assert e.snapshot().drops["tun_write_failed"] == 3
    tun.fail_writes = False
    udp.queue_gro([vxlan(udp_dgram()) for _ in range(3)], "10.10.1.2")
    e.udp_readable()
    assert len(tun.written) == 3  # one write per datagram from now on


def test_tx_equal_size_packets_below_the_mtu_leave_in_one_gso_call_as_an_iovec() -> None:
    e, tun, udp = engine()
    pkts = [udp_dgram(src="10.244.1.2", dst="10.244.2.2", payload=bytes([i]) * 1400)
            for i in range(4)]
    for p in pkts:
        tun.queue_packet(p)
    tun.queue_packet(icmp())  # shorter: may close the run (GSO's last datagram)
    tun.queue_packet(icmp())  # after a shorter one: a new run
    e.tun_readable()
    assert [s.gso_call for s in udp.sent] == [1, 1, 1, 1, 1, 0]
    assert [s.data[22:] for s in udp.sent] == [*pkts, icmp(), icmp()]
    assert e.snapshot().peers["10.244.2.0/24"].tx_packets == 6
