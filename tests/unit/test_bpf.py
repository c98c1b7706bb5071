"""The BPF interpreter against libpcap's own: same verdict on every packet.

The reference is libpcap itself, through ctypes: ``pcap_compile`` compiles each
expression independently of ``dataplane.bpf`` and ``pcap_offline_filter`` runs the
program on a ``pcap_pkthdr`` + bytes. Packets are hypothesis-built IPv4 (TCP, UDP,
ICMP, other protocols; options, fragments, truncation) and some IPv6, plus garbage.
Random straight-line-and-branch programs cover the opcodes libpcap rarely emits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import IPv6

from dataplane import bpf
from dataplane.bpf import FilterError, Program, compile_filter
from dataplane.pcapng import LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_RAW

EXPRS = [
    # The set.
    "host 10.244.2.5",
    "tcp port 80",
    "host 10.244.2.5 and tcp port 80",
    "icmp",
    "udp and not port 53",
    "net 10.244.0.0/16",
    "src host 10.244.2.5 or dst portrange 1000-2000",
    "ip[8] < 5",
    "tcp[tcpflags] & tcp-syn != 0",
    "len > 100",
    "ip[6:2] & 0x1fff != 0",
    # More of the grammar, and every ALU op, indexed load and scratch slot it emits.
    "ip6",
    "ip6 and tcp port 80",
    "icmp[icmptype] == icmp-echo",
    "udp dst port 8472",
    "ip proto 47",
    "ip multicast",
    "less 64 or greater 200",
    "src net 10.244.2.0/24 and dst net 10.244.1.0/24",
    "tcp[13] = 2 and ip[6] & 0x40 != 0",
    "portrange 1000-2000 and not icmp",
    "ip[0] & 0xf > 5",
    "ip[2:2] % 7 == 3",
    "ip[9] ^ 6 == 0",
    "-ip[8] & 0xff < 100",
    "ip[8] * 3 - 2 > 100",
    "ip[8] / 3 > 2",
    "ip[8] << 2 > 100",
    "ip[8] << (ip[9] & 63) != 0",  # shift by X of 32 or more
    "ip[8] / (ip[9] & 1) > 0",  # division by a zero X
    "ip[8] % (ip[9] & 1) == 0",
    "len - 10 > ip[2:2]",
    "ip[ip[0] & 0xf] > 3",
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",
    "(ip[12:4] | ip[16:4]) & 0xff == 5",
    "udp[8:4] = 0x08000000",
]


class _Ref:
    """libpcap's compiler and its bpf_filter, called directly."""

    class Insn(ctypes.Structure):
        _fields_ = (
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint32),
        )

    class Prog(ctypes.Structure):
        _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p))

    class Hdr(ctypes.Structure):  # struct pcap_pkthdr: struct timeval, caplen, len
        _fields_ = (
            ("tv_sec", ctypes.c_long),
            ("tv_usec", ctypes.c_long),
            ("caplen", ctypes.c_uint32),
            ("len", ctypes.c_uint32),
        )

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("pcap") or "libpcap.so.0.8")
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pcap_compile.argtypes = (
            ctypes.c_void_p, ctypes.POINTER(self.Prog), ctypes.c_char_p, ctypes.c_int,
            ctypes.c_uint32,
        )  # fmt: skip
        lib.pcap_offline_filter.restype = ctypes.c_int
        lib.pcap_offline_filter.argtypes = (
            ctypes.POINTER(self.Prog), ctypes.POINTER(self.Hdr), ctypes.c_char_p,
        )  # fmt: skip
        self.lib = lib
        self.dlt_raw = lib.pcap_datalink_name_to_val(b"RAW")
        self.keep: list[Any] = []

    def compile(self, expr: str, optimize: bool) -> tuple[Prog, list[tuple[int, int, int, int]]]:
        handle = self.lib.pcap_open_dead(self.dlt_raw, 262144)
        prog = self.Prog()
        assert (
            self.lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), optimize, 0xFFFFFFFF)
            == 0
        )
        insns = ctypes.cast(prog.bf_insns, ctypes.POINTER(self.Insn))
        return prog, [
            (insns[i].code, insns[i].jt, insns[i].jf, insns[i].k) for i in range(prog.bf_len)
        ]

    def build(self, insns: list[tuple[int, int, int, int]]) -> Prog:
        arr = (self.Insn * len(insns))(*(self.Insn(*i) for i in insns))
        self.keep.append(arr)
        return self.Prog(len(insns), ctypes.cast(arr, ctypes.c_void_p))

    def run(self, prog: Prog, packet: bytes, wire_len: int) -> int:
        hdr = self.Hdr(0, 0, len(packet), wire_len)
        ret = self.lib.pcap_offline_filter(ctypes.byref(prog), ctypes.byref(hdr), packet)
        return int(ret) & 0xFFFFFFFF


try:
    REF = _Ref()
except OSError:  # pragma: no cover - CI installs libpcap0.8
    pytest.skip("needs libpcap (Debian package libpcap0.8)", allow_module_level=True)

# (expression, optimized?) -> (ours, libpcap's program)
CASES = {
    (e, opt): (compile_filter(e, optimize=opt), REF.compile(e, opt)[0])
    for e in EXPRS
    for opt in (True, False)
}


def check_all(packet: bytes, wire_len: int) -> None:
    for (expr, opt), (ours, ref) in CASES.items():
        want = REF.run(ref, packet, wire_len)
        assert ours.run(packet, wire_len) == want, (expr, opt, packet.hex(), wire_len)
        assert ours.match(memoryview(packet), wire_len) is (want != 0)


addr = st.sampled_from(["10.244.2.5", "10.244.1.2", "10.244.2.9", "224.0.0.5"]) | st.builds(
    "10.{}.{}.{}".format, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)
)
port = st.one_of(
    st.just(80), st.sampled_from([53, 999, 1000, 1500, 2000, 2001, 8472]), st.integers(0, 65535)
)
tcp_flags = st.sampled_from([0x02, 0x12, 0x10, 0x18, 0x11, 0x04]) | st.integers(0, 255)


@st.composite
def ipv4_packets(draw: st.DrawFn) -> tuple[bytes, int]:
    frag_off = draw(st.sampled_from([0] * 9 + [1, 185, 8191]))
    ip = IP(
        src=draw(addr), dst=draw(addr), ttl=draw(st.integers(0, 255)),
        flags=draw(st.sampled_from([0, 1, 2])), frag=frag_off,
        options=[IPOption_NOP()] * draw(st.sampled_from([0, 0, 1, 4, 7, 40])),
    )  # fmt: skip
    kind = draw(st.sampled_from(["tcp", "udp", "icmp", "other"]))
    payload = draw(
        st.sampled_from([b"", b"", b"GET / HTTP/1.1\r\n", b"\x08\x00\x00\x00\x00\x00\x01\x00"])
    )
    payload += bytes(draw(st.integers(0, 180)))
    if kind == "tcp":
        opts = [("MSS", 1400)] if draw(st.booleans()) else []
        pkt = ip / TCP(sport=draw(port), dport=draw(port), flags=draw(tcp_flags),
                       options=opts) / payload  # fmt: skip
    elif kind == "udp":
        pkt = ip / UDP(sport=draw(port), dport=draw(port)) / payload
    elif kind == "icmp":
        pkt = ip / ICMP(type=draw(st.sampled_from([0, 3, 8, 11])), code=0) / payload
    else:
        ip.proto = draw(st.sampled_from([47, 50, 132]))
        pkt = ip / payload
    raw = bytes(pkt) + bytes(draw(st.sampled_from([0, 0, 0, 6, 20])))  # link padding
    cut = draw(st.sampled_from([None] * 12 + [1, 10, 20, 21, 30, 40]))  # truncated capture
    return (raw if cut is None else raw[:cut]), len(raw)


@st.composite
def ipv6_packets(draw: st.DrawFn) -> tuple[bytes, int]:
    l4 = TCP(dport=draw(port)) if draw(st.booleans()) else UDP(dport=draw(port))
    raw = bytes(IPv6(src="fd00::1", dst="fd00::2") / l4 / bytes(draw(st.integers(0, 64))))
    return raw, len(raw)


slow = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings(slow, max_examples=600)
@given(st.one_of(ipv4_packets(), ipv4_packets(), ipv4_packets(), ipv6_packets()))
def test_same_verdict_as_libpcap_on_ip_packets(pw: tuple[bytes, int]) -> None:
    check_all(*pw)


@settings(slow, max_examples=300)
@given(st.binary(max_size=80), st.integers(0, 2000))
def test_garbage_and_short_packets_same_verdict_no_exception(packet: bytes, extra: int) -> None:
    check_all(packet, len(packet) + extra)


def test_hand_picked_packets_match_as_expected() -> None:
    """Not only equal to libpcap: the verdicts a user expects, so the fixture is sound."""
    web = bytes(IP(src="10.244.2.5", dst="10.244.1.2") / TCP(sport=40000, dport=80, flags="S"))
    dns = bytes(IP(src="10.244.1.2", dst="10.1.1.1") / UDP(sport=5000, dport=53))
    frag = bytes(IP(src="10.9.9.9", dst="10.9.9.8", frag=100) / bytes(8))
    f = compile_filter
    assert f("host 10.244.2.5 and tcp port 80").match(web)
    assert not f("host 10.244.2.5 and tcp port 80").match(dns)
    assert f("tcp[tcpflags] & tcp-syn != 0").match(web)
    assert not f("udp and not port 53").match(dns)
    assert f("net 10.244.0.0/16").match(dns) and not f("net 10.244.0.0/16").match(frag)
    assert f("ip[6:2] & 0x1fff != 0").match(frag) and not f("ip[6:2] & 0x1fff != 0").match(web)
    assert f("len > 100").match(dns, wire_len=101) and not f("len > 100").match(dns)
    assert not f("tcp port 80").match(web[:21])  # port beyond the captured bytes


@pytest.mark.parametrize("expr", EXPRS)
def test_compiled_program_is_libpcaps(expr: str) -> None:
    ours = [(i.code, i.jt, i.jf, i.k) for i in compile_filter(expr).insns]
    assert ours == REF.compile(expr, True)[1]


# Random programs: every opcode, jumps forward to anywhere, loads in and out of range.
_K = st.sampled_from([0, 1, 2, 3, 9, 14, 20, 31, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 64)
_SHIFT = st.integers(0, 31)
_NONZERO = st.integers(1, 0xFFFFFFFF)


@st.composite
def programs(draw: st.DrawFn) -> list[tuple[int, int, int, int]]:
    # libpcap's bpf_filter leaves scratch memory uninitialised (the kernel refuses such
    # programs), so every slot is stored first.
    body: list[tuple[int, int, int, int]] = [(bpf.ST, 0, 0, m) for m in range(16)]
    n = draw(st.integers(1, 24))
    for pos in range(n):
        left = n - pos  # instructions after this one, counting the final RET A
        code = draw(st.sampled_from(sorted(bpf.OPCODES - {bpf.RET_K, bpf.RET_A})))
        k = draw(_K)
        jt = jf = 0
        if code in (bpf.LD_MEM, bpf.LDX_MEM, bpf.ST, bpf.STX):
            k = draw(st.integers(0, 15))
        elif code in (bpf.ALU_DIV, bpf.ALU_MOD):
            k = draw(_NONZERO)
        elif code in (bpf.ALU_LSH, bpf.ALU_RSH):
            k = draw(_SHIFT)
        elif code == bpf.JMP_JA:
            k = draw(st.integers(0, left - 1))
        elif code & 0x07 == 0x05:  # conditional jump, K or X
            jt = draw(st.integers(0, min(left - 1, 255)))
            jf = draw(st.integers(0, min(left - 1, 255)))
        if code in (bpf.LDX_IMM, bpf.LD_IMM) and draw(st.booleans()):
            k = draw(st.integers(0, 40))  # small X/A values make IND loads and X shifts hit
        body.append((code, jt, jf, k))
    body.append((bpf.RET_A, 0, 0, 0))
    return body


@settings(slow, max_examples=1000)
@given(programs(), st.binary(max_size=48), st.integers(0, 100))
def test_random_programs_same_result_as_libpcap(
    insns: list[tuple[int, int, int, int]], packet: bytes, extra: int
) -> None:
    wire_len = len(packet) + extra
    got = Program(insns).run(packet, wire_len)
    assert got == REF.run(REF.build(insns), packet, wire_len)
    event("accepted" if got else "rejected")


def test_filter_errors_carry_libpcaps_message() -> None:
    with pytest.raises(FilterError, match="syntax error"):
        compile_filter("host 10.244.2.5 and")
    with pytest.raises(FilterError, match="illegal port number"):
        compile_filter("tcp port 70000")
    with pytest.raises(FilterError, match="ethernet addresses supported only"):
        compile_filter("ether host 02:00:00:00:00:01")  # raw IP has no MACs
    with pytest.raises(FilterError, match="shift by more than 31 bits"):
        compile_filter("ip[0] << 33 != 0")


def test_link_types() -> None:
    eth = compile_filter("ether host 02:00:00:00:00:01 and icmp", LINKTYPE_ETHERNET)
    frame = bytes.fromhex("0200000000010200000000020800") + bytes(IP(dst="10.0.0.1") / ICMP())
    assert eth.match(frame) and not eth.match(frame[14:])
    v4 = compile_filter("icmp", LINKTYPE_IPV4)
    assert v4.match(bytes(IP() / ICMP())) and not v4.match(bytes(IP() / UDP()))
    assert compile_filter("icmp", LINKTYPE_RAW).match(bytes(IP() / ICMP()))


def test_empty_expression_matches_everything() -> None:
    for expr in ("", "   "):
        prog = compile_filter(expr)
        assert prog.match(b"") and prog.match(b"\xff" * 100) and len(prog) == 1
    assert compile_filter("", snaplen=96).run(b"x") == 96


def test_match_returns_snaplen_as_libpcap() -> None:
    prog = compile_filter("icmp", snaplen=1500)
    assert prog.run(bytes(IP() / ICMP())) == 1500 and prog.run(bytes(IP() / UDP())) == 0


@pytest.mark.parametrize(
    ("insns", "msg"),
    [
        ([], "1..4096"),
        ([(0x0E, 0, 0, 0)], "unsupported opcode"),  # RET X: libpcap's bpf_filter aborts
        ([(bpf.LD_IMM, 0, 0, 1)], "must end in RET"),
        ([(bpf.JMP_JA, 0, 0, 1), (bpf.RET_K, 0, 0, 0)], "jump out"),
        ([(bpf.JMP_JEQ, 0, 1, 0), (bpf.RET_K, 0, 0, 0)], "jump out"),
        ([(bpf.ST, 0, 0, 16), (bpf.RET_K, 0, 0, 0)], "scratch memory"),
        ([(bpf.ALU_DIV, 0, 0, 0), (bpf.RET_K, 0, 0, 0)], "division by constant 0"),
        ([(bpf.ALU_MOD, 0, 0, 0), (bpf.RET_K, 0, 0, 0)], "division by constant 0"),
        ([(bpf.ALU_LSH, 0, 0, 32), (bpf.RET_K, 0, 0, 0)], "shift by constant"),
        ([(bpf.LD_IMM, 0, 0, 1 << 32), (bpf.RET_A, 0, 0, 0)], "out of range"),
    ],
)
def test_invalid_programs_are_refused(insns: list[tuple[int, int, int, int]], msg: str) -> None:
    with pytest.raises(FilterError, match=msg):
        Program(insns)


def test_ddd_round_trip() -> None:
    prog = compile_filter("host 10.244.2.5 and tcp port 80")
    again = Program.from_ddd(prog.dump(), prog.expr)
    assert again.insns == prog.insns and again.expr == prog.expr
    for bad in ("", "2\n6 0 0 0", "x"):
        with pytest.raises(FilterError):
            Program.from_ddd(bad)
