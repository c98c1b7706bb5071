"""Write the seed corpus, tests/fuzz/corpus/<target>/: real frames built with scapy,
valid configs, leases, etcd answers, each in its target's input format.

    .venv/bin/python -m tests.fuzz.make_corpus     # rewrites the seeds (deterministic)

atheris starts from these; the unit tests replay every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP

from dataplane import vnet, wire
from tests.fuzz import targets as t

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
OWN = "02:00:00:00:00:01"
PEER = "02:00:00:00:00:02"


def frame(inner: bytes, ethertype: int = wire.ETH_P_IP) -> bytes:
    """A VXLAN datagram as a peer sends it to us."""
    return wire.build_frame(t.VNI, t.OWN_MAC, t.PEER_MAC, inner, ethertype)


def ip_icmp() -> bytes:
    return bytes(IP(src="10.7.2.5", dst="10.7.1.5", ttl=63) / ICMP(id=7, seq=1) / b"hello")


def ip_tcp(payload: int = 100, flags: str = "A", seq: int = 1000, opts: bool = False) -> bytes:
    options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if opts else []
    return bytes(IP(src="10.7.2.5", dst="10.7.1.5", id=9) / TCP(
        sport=40000, dport=5201, seq=seq, ack=77, flags=flags, options=options)
        / (b"d" * payload))


def ip_udp() -> bytes:
    return bytes(IP(src="10.7.2.5", dst="10.7.1.5") / UDP(sport=5353, dport=53) / (b"q" * 30))


def arp_request() -> bytes:
    return bytes(ARP(op=1, hwsrc=PEER, psrc="10.7.2.0", hwdst="00:00:00:00:00:00",
                     pdst="10.7.1.0"))


def records(items: Iterable[tuple[int, bytes]]) -> bytes:
    """The ``[flags][len u16][bytes]`` record format of the multi-packet targets."""
    return b"".join(bytes([f]) + struct.pack("!H", len(b)) + b for f, b in items)


def tcp_reader_input(payload: bytes, opts: int = 0) -> bytes:
    """Input for targets.Reader-driven _tcp_packet: no IP options, ``opts`` TCP words."""
    hdr = bytes(IP(src="10.7.1.5", dst="10.7.2.5", id=1)) + bytes(
        TCP(sport=40000, dport=5201, seq=1, ack=77, flags="A"))
    return bytes([0, 0, opts]) + hdr + bytes(4 * opts) + payload


def seeds() -> dict[str, list[bytes]]:
    tcp = ip_tcp()
    big = ip_tcp(3000)
    return {
        "vxlan_header": [wire.vxlan_header(1), wire.vxlan_header(0xFFFFFF), b"\x0c" + bytes(7)],
        "frame": [bytes([0, 2, 0]) + frame(p) for p in (ip_icmp(), tcp, big, ip_udp())]
        + [bytes([0, 2, 0]) + frame(arp_request(), wire.ETH_P_ARP),
           bytes([0xFF, 2, 0]) + frame(ip_icmp())],
        "ipv4": [bytes([0, 0, 2]) + p for p in (ip_icmp(), tcp, big, ip_tcp(10, opts=True))]
        + [bytes([0x18, 3, 2]) + bytes(3) + ip_udp()],
        "tun_packet": [bytes([0]) + struct.pack("!H", 1450) + p for p in (ip_icmp(), tcp)],
        "icmp_unreachable": [ip_icmp(), tcp, ip_udp(), bytes(IP() / ICMP(type=3) / (b"x" * 28))],
        "arp": [b"\x00" + arp_request(), b"\x03" + arp_request()],
        "vnet_hdr": [vnet.VnetHdr(1, 1, 52, 1398, 20, 16).pack() + bytes([0, 2]) + p
                     for p in (tcp, big, ip_udp())],
        "tso_split": [struct.pack("!HB", 1398, 0) + tcp_reader_input(b"x" * 4000),
                      struct.pack("!HB", 1386, 1) + tcp_reader_input(b"y" * 3000, 3)],
        "gro": [bytes([2]) + tcp_reader_input(b"") + struct.pack("!H", 1409) + bytes([8])
                + bytes(8) + bytes([2])],
        "config": [t_.encode() for t_ in (
            '{"Network":"10.7.0.0/16","Backend":{"Type":"VxLAN","Directrouting":true}}',
            '{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}',
            '{"Network":"10.5.0.0/16","SubnetLen":26,"SubnetMin":"10.5.1.0",'
            '"SubnetMax":"10.5.200.192","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,'
            '"MTU":1400,"GBP":false,"Learning":false}}',
            '{"network":"10.9.0.0/24","backend":{"type":"vxlan"},"EnableIPv4":true}')],
        "lease": [bytes([len(k)]) + k + v for k, v in (
            (b"/coreos.com/network/subnets/10.7.2.0-24",
             t.encode_lease("10.10.1.2", "02:00:00:00:00:02")),
            (b"/coreos.com/network/subnets/10.7.3.0-24&fd00::-64",
             b'{"PublicIP":"10.10.1.3","PublicIPv6":null,"BackendType":"host-gw"}'),
            (b"10.7.4.0-24", t.encode_lease("10.10.1.4", "aa:bb:cc:dd:ee:ff", partial=True)))],
        "subnetenv": [b"FLANNEL_NETWORK=10.7.0.0/16\nFLANNEL_SUBNET=10.7.1.1/24\n"
                      b"FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", b"# c\nFLANNEL_SUBNET=x\n"],
        "etcd_v2": [bytes([0, 2]) + b"42" + json.dumps(doc).encode() for doc in (
            {"action": "get", "node": {"key": "/coreos.com/network/config",
                                       "value": '{"Network":"10.7.0.0/16"}',
                                       "modifiedIndex": 5, "createdIndex": 5}},
            {"action": "get", "node": {"key": "/coreos.com/network/subnets", "dir": True,
                                       "nodes": [{"key": "/coreos.com/network/subnets/"
                                                         "10.7.2.0-24",
                                                  "value": t.encode_lease(
                                                      "10.10.1.2", PEER).decode(),
                                                  "expiration":
                                                      "2026-11-27T10:00:00.123456789Z",
                                                  "ttl": 86000, "modifiedIndex": 9,
                                                  "createdIndex": 9}],
                                       "modifiedIndex": 3, "createdIndex": 3}},
            {"action": "expire", "node": {"key": "/coreos.com/network/subnets/10.7.2.0-24",
                                          "modifiedIndex": 12, "createdIndex": 9},
             "prevNode": {"key": "/coreos.com/network/subnets/10.7.2.0-24", "value": "x"}})]
        + [bytes([6, 2]) + b"42" + json.dumps({"errorCode": 100, "message": "Key not found",
                                               "cause": "/coreos.com", "index": 42}).encode(),
           bytes([7, 0]) + b"\xff\xfe garbage"],
        "etcd_v3": [bytes([3]) + records([
            (0x01 | 0x04, bytes([11]) + b"10.7.2.0-24" + t.encode_lease("10.10.1.2", PEER)
             + b"\x00\x09"),
            (0x01 | 0x02 | 0x04, bytes([11]) + b"10.7.2.0-24" + b"\x00\x0a")])],
        "watch": [records([(0x80 | 0x20 | 2, b""), (0x80 | 3, b""), (0x40 | 2, b""),
                           (5, t.encode_lease("10.10.1.5", PEER)), (6, b"{not json")])],
    }


def main() -> None:
    total = 0
    for name, items in seeds().items():
        assert name in t.TARGETS, name
        d = os.path.join(HERE, name)
        os.makedirs(d, exist_ok=True)
        for item in items:
            path = os.path.join(d, hashlib.sha1(item).hexdigest()[:16])
            with open(path, "wb") as f:
                f.write(item)
            total += len(item)
    missing = set(t.TARGETS) - set(seeds())
    assert not missing, missing
    print(f"{sum(len(v) for v in seeds().values())} seeds, {total} bytes in {HERE}")


if __name__ == "__main__":
    main()
