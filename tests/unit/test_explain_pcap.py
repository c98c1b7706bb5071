"""`flannelette explain --pcap FILE` end to end without root: a capture written with the
project's pcapng writer (and a libpcap file from scapy), explained by the real CLI
against a real HealthServer serving /debug/* over a fixed node view.

Each packet's line must carry the verdict the node gives it now: inner packets as
sent by a container, VXLAN datagrams from a peer as received (with their VNI and
inner destination MAC), VXLAN datagrams from our own PublicIP as sent, and the
packets explain cannot take (not IPv4, ARP in VXLAN, a broken header) named as such
instead of ending the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.utils import wrpcap

from control import debugcli
from control.debugapi import DebugApi
from control.debugpcap import outer_frame
from control.explain import NodeView
from control.health import HealthServer
from control.reconcile import RouteLookup
from control.statusdoc import ConfigGeneration
from dataplane.fib import Path as FibPath
from dataplane.fib import Peer
from dataplane.pcapng import LINKTYPE_ETHERNET, LINKTYPE_RAW, PcapngWriter
from dataplane.wire import ETH_P_ARP, build_frame

NET = ipaddress.IPv4Network
ADDR = ipaddress.IPv4Address
OWN_MAC = bytes.fromhex("0a0000000001")
PEER_MAC = bytes.fromhex("0a0000000002")
STALE_MAC = bytes.fromhex("0a0000000099")
PEER = Peer(NET("10.244.2.0/24"), ADDR("10.10.1.2"), PEER_MAC, FibPath.VXLAN,
            partial_csum=True)
GENERATION = ConfigGeneration(key="/coreos.com/network/config", api="v3", revision=57,
                              revision_exact=True, applied=2, latest_revision=57)
NODE = NodeView(subnet=NET("10.244.1.0/24"), public_ip=ADDR("10.10.1.1"), vtep_mac=OWN_MAC,
                network=NET("10.244.0.0/16"), peers=(PEER,), tun="flannel.1",
                generation=GENERATION)
NOW = 1_000_000.0
CONFIG_LINE = ("config: backend vxlan, VNI 1, port 8472, MTU 1450, Network 10.244.0.0/16; "
               "from /coreos.com/network/config at etcd v3 revision 57, 2 changes applied "
               "since start; the newest value seen in etcd")


def _route_get(addrs: Sequence[ipaddress.IPv4Address]
               ) -> dict[ipaddress.IPv4Address, tuple[RouteLookup, ...] | None]:
    """The kernel of a vxlan node: the overlay into flannel.1, the underlay via eth0, our
    PublicIP local."""
    return {a: (RouteLookup(None, "flannel.1"),) if a in NET("10.244.0.0/16")
            else (RouteLookup(None, "lo", local=True),) if a == NODE.public_ip
            else (RouteLookup(None, "eth0"),) for a in addrs}


@contextlib.contextmanager
def serving(node: NodeView) -> Iterator[int]:
    """/debug/* for ``node`` on a HealthServer in a thread (the CLI runs in this one)."""
    loop = asyncio.new_event_loop()
    api = DebugApi(lambda: [], lambda: node, route_get=_route_get, clock=lambda: NOW)
    server = HealthServer("127.0.0.1", 0, {}, api.streams())
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _ping(src: str, dst: str, seq: int = 1) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(seq=seq) / (b"x" * 24))


def _tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))


def _vxlan(inner: bytes, dst_mac: bytes = OWN_MAC, src_mac: bytes = PEER_MAC, vni: int = 1,
           ethertype: int = 0x0800) -> bytes:
    return build_frame(vni, dst_mac, src_mac, inner, ethertype)


def _capture(path: Path) -> None:
    """A flannelette-style pcapng: an "outer" Ethernet and an "inner" raw-IPv4 interface."""
    buf = io.BytesIO()
    w = PcapngWriter(buf, flush=False)
    outer = w.add_interface(LINKTYPE_ETHERNET, "outer")
    inner = w.add_interface(LINKTYPE_RAW, "inner")
    ts = iter(range(1, 100))
    ping = _ping("10.244.1.2", "10.244.2.2")
    arp = bytes(ARP(op=1, hwsrc="0a:00:00:00:00:02", psrc="10.244.2.0", pdst="10.244.1.0"))
    broken = bytearray(_ping("10.244.1.2", "10.244.2.2"))
    broken[2:4] = (12).to_bytes(2, "big")  # total length 12: below its own header
    frames = [
        (inner, ping),  # 1: a container's ping, as the TUN gave it
        (outer, outer_frame(_vxlan(ping, PEER_MAC, OWN_MAC), "10.10.1.1", "10.10.1.2",
                            41000, 8472)),  # 2: the same ping as we sent it
        (outer, outer_frame(_vxlan(_tcp("10.244.2.2", "10.244.1.2", 40000, 80)),
                            "10.10.1.2", "10.10.1.1", 0, 8472)),  # 3: received, accepted
        (outer, outer_frame(_vxlan(_ping("10.244.2.2", "10.244.1.2"), STALE_MAC),
                            "10.10.1.2", "10.10.1.1", 0, 8472)),  # 4: to a stale VtepMAC
        (outer, outer_frame(_vxlan(_ping("10.244.2.9", "10.244.1.2"), vni=2),
                            "10.10.1.2", "10.10.1.1", 0, 8472)),  # 5: another VNI
        (outer, outer_frame(_vxlan(_ping("10.244.3.3", "10.244.1.2")),
                            "10.10.1.3", "10.10.1.1", 0, 8472)),  # 6: from no peer
        (outer, outer_frame(_vxlan(arp, ethertype=ETH_P_ARP), "10.10.1.2", "10.10.1.1",
                            0, 8472)),  # 7: ARP over the tunnel
        (inner, bytes(broken)),  # 8: a broken IPv4 header
        (inner, bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP())),  # 9: not IPv4
        (inner, _ping("10.244.1.2", "10.244.9.9")),  # 10: nobody leases 10.244.9.0/24
        (inner, bytes(IP(src="10.244.1.2", dst="10.244.2.2") / UDP(sport=5353, dport=53))),
    ]
    for iface, data in frames:
        w.write_packet(iface, next(ts) * 1000, data)
    path.write_bytes(buf.getvalue())


EXPECTED = [
    "#1 icmp 10.244.1.2 > 10.244.2.2: vxlan peer 10.244.2.0/24 (10.10.1.2)",
    "#2 icmp 10.244.1.2 > 10.244.2.2 (VXLAN to 10.10.1.2, as sent): vxlan peer 10.244.2.0/24 "
    "(10.10.1.2)",
    "#3 tcp 10.244.2.2:40000 > 10.244.1.2:80 (VXLAN from 10.10.1.2): vxlan peer 10.244.2.0/24 "
    "(10.10.1.2)",
    "#4 icmp 10.244.2.2 > 10.244.1.2 (VXLAN from 10.10.1.2): dropped peer 10.244.2.0/24 "
    "(10.10.1.2): not_for_our_mac",
    "#5 icmp 10.244.2.9 > 10.244.1.2 (VXLAN from 10.10.1.2): dropped peer 10.244.2.0/24 "
    "(10.10.1.2): wrong_vni",
    "#6 icmp 10.244.3.3 > 10.244.1.2 (VXLAN from 10.10.1.3): dropped: unknown_peer",
    "#7 udp 10.10.1.2 > 10.10.1.1:8472 (VXLAN from 10.10.1.2): not explained: it carries "
    "EtherType 0x0806, not IPv4: explain covers IPv4 packets (the engine answers ARP requests "
    "for its own subnet itself)",
    "#8 IPv4 10.244.1.2 > 10.244.2.2: not explained: IPv4 header length 20 / total length 12 "
    "are broken: the engine drops it as bad_ipv4_header",
    "#9 IPv6 / UDP fd00::1:domain > fd00::2:domain: not explained: not an IPv4 packet",
    "#10 icmp 10.244.1.2 > 10.244.9.9: no-route: no_route",
    "#11 udp 10.244.1.2:5353 > 10.244.2.2:53: vxlan peer 10.244.2.0/24 (10.10.1.2)",
]


def test_every_packet_of_a_capture_gets_its_verdict(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    path = tmp_path / "mixed.pcapng"
    _capture(path)
    with serving(NODE) as port:
        rc = debugcli.explain_main(["--pcap", str(path), "--healthz-port", str(port)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    lines = out.out.splitlines()
    assert lines[0] == f"explain --pcap {path}: 11 packets, as 10.244.1.0/24 would handle them now"
    assert lines[1] == CONFIG_LINE
    assert lines[2:-1] == EXPECTED
    assert lines[-1] == "(dropped 3, no-route 1, not explained 3, vxlan 4)"


def test_json_lines_carry_the_verdict_peer_and_config(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    path = tmp_path / "mixed.pcapng"
    _capture(path)
    with serving(NODE) as port:
        rc = debugcli.explain_main(["--pcap", str(path), "--json", "--max-packets", "4",
                                    "--healthz-port", str(port)])
    assert rc == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["packet"], d["verdict"], d["direction"], d["reason"]) for d in docs] == [
        (1, "vxlan", "tx", None), (2, "vxlan", "tx", None), (3, "vxlan", "rx", None),
        (4, "dropped", "rx", "not_for_our_mac")]
    assert docs[3]["probe"]["inner_dst_mac"] == "0a:00:00:00:00:99"
    assert docs[3]["probe"]["outer_src"] == "10.10.1.2" and docs[3]["probe"]["vni"] == "1"
    assert docs[2]["probe"] | {"size": None} == {
        "src": "10.244.2.2", "dst": "10.244.1.2", "proto": "tcp", "sport": "40000",
        "dport": "80", "outer_src": "10.10.1.2", "vni": "1",
        "inner_dst_mac": "0a:00:00:00:00:01", "size": None}
    assert all(d["config"]["revision"] == 57 and d["config"]["current"] for d in docs)
    assert docs[0]["peer"]["vtep_mac"] == "0a:00:00:00:00:02"
    assert docs[0]["steps"][0]["step"] == "config"
    assert docs[0]["steps"][0]["detail"] == CONFIG_LINE.removeprefix("config: ")


def test_a_libpcap_file_on_another_vxlan_port(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """tcpdump's format, a node on Backend.Port 9000 (scapy decodes no VXLAN there by
    itself), a kernel peer's ephemeral source port, and a standalone engine (no config)."""
    node = NodeView(subnet=NODE.subnet, public_ip=NODE.public_ip, vtep_mac=OWN_MAC,
                    peers=(PEER,), tun="flannel.1", port=9000)
    path = tmp_path / "underlay.pcap"
    big = bytes(IP(src="10.244.2.2", dst="10.244.1.2") / UDP(sport=7, dport=7)
                / (b"y" * 1472))
    wrpcap(str(path), [
        Ether(outer_frame(_vxlan(_ping("10.244.2.2", "10.244.1.2")), "10.10.1.2", "10.10.1.1",
                          53211, 9000)),
        Ether(outer_frame(_vxlan(big), "10.10.1.2", "10.10.1.1", 53211, 9000)),
        Ether(outer_frame(_vxlan(_ping("10.244.2.2", "10.244.1.2")), "10.10.1.2", "10.10.1.1",
                          53211, 8472)),  # not our port: plain UDP between the hosts
    ])
    with serving(node) as port:
        rc = debugcli.explain_main(["--pcap", str(path), "--healthz-port", str(port)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.splitlines() == [
        f"explain --pcap {path}: 3 packets, as 10.244.1.0/24 would handle them now",
        "#1 icmp 10.244.2.2 > 10.244.1.2 (VXLAN from 10.10.1.2): vxlan peer 10.244.2.0/24 "
        "(10.10.1.2)",
        "#2 udp 10.244.2.2:7 > 10.244.1.2:7 (VXLAN from 10.10.1.2): dropped peer "
        "10.244.2.0/24 (10.10.1.2): oversize",
        "#3 udp 10.10.1.2:53211 > 10.10.1.1:8472: local",
        "(dropped 1, local 1, vxlan 1)",
    ]


def test_unreadable_file_and_bad_bound_are_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"not a capture at all")
    with serving(NODE) as port:
        assert debugcli.explain_main(["--pcap", str(junk), "--healthz-port", str(port)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"flannelette explain: cannot read {junk}: ") and err.count(
            "\n") == 1
        assert debugcli.explain_main(["--pcap", str(junk), "--max-packets", "0",
                                      "--healthz-port", str(port)]) == 1
        assert "--max-packets must be >= 1" in capsys.readouterr().err
