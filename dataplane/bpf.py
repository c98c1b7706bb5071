"""pcap-filter expressions on inner packets: libpcap compiles, Python runs the result.

Users already know pcap-filter (``host 10.244.2.5 and tcp port 80``), and only
libpcap knows all of it, so :func:`compile_filter` lets Debian's libpcap
(``libpcap.so.0.8``, package ``libpcap0.8``) compile the expression to classic BPF
through ctypes (``pcap_open_dead`` + ``pcap_compile``; no capture handle, no
privileges), and :class:`Program` runs that program in a small pure-Python
interpreter on each candidate packet, only while a capture or trace is on.

Why ctypes and not ``tcpdump -ddd``: one library call instead of a process per
compile, no tcpdump package, and libpcap's own error text ("syntax error") comes
back as it is; ``-ddd`` output is also accepted (:meth:`Program.from_ddd`) for
programs made elsewhere.

The interpreter follows libpcap's ``bpf_filter`` (the reference that
``pcap_offline_filter`` runs, and what the kernel's classic BPF does for these
programs): a load past the captured bytes, or a division by a zero X, ends the
program with 0 (no match); ``len`` is the wire length; a shift by an X of 32 or
more gives 0. Programs are checked once when built (known opcodes, jumps forward
and inside the program, scratch memory 0..15, no division by a constant 0, no
constant shift of 32 or more, ends in RET: what the kernel's checker asks), so
:meth:`Program.match` cannot raise on any packet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from dataplane.errors import DataplaneError
from dataplane.pcapng import DEFAULT_SNAPLEN, LINKTYPE_RAW

__all__ = ["OPCODES", "FilterError", "Insn", "Program", "compile_filter"]

# Classic BPF opcodes (linux/filter.h, pcap/bpf.h): class | size | mode, class | op | src.
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_H_IND, LD_B_IND = 0x40, 0x48, 0x50
LD_W_LEN, LD_IMM, LD_MEM = 0x80, 0x00, 0x60
LDX_IMM, LDX_MEM, LDX_W_LEN, LDX_B_MSH = 0x01, 0x61, 0x81, 0xB1
ST, STX = 0x02, 0x03
ALU_ADD, ALU_SUB, ALU_MUL, ALU_DIV = 0x04, 0x14, 0x24, 0x34
ALU_OR, ALU_AND, ALU_LSH, ALU_RSH = 0x44, 0x54, 0x64, 0x74
ALU_NEG, ALU_MOD, ALU_XOR = 0x84, 0x94, 0xA4
ALU_X = 0x08  # source bit: X instead of k
JMP_JA, JMP_JEQ, JMP_JGT, JMP_JGE, JMP_JSET = 0x05, 0x15, 0x25, 0x35, 0x45
JMP_X = 0x08
RET_K, RET_A = 0x06, 0x16
TAX, TXA = 0x07, 0x87

_ALU_K = {ALU_ADD, ALU_SUB, ALU_MUL, ALU_DIV, ALU_OR, ALU_AND, ALU_LSH, ALU_RSH, ALU_MOD, ALU_XOR}
_ALU = _ALU_K | {op | ALU_X for op in _ALU_K} | {ALU_NEG}
_COND = {JMP_JEQ, JMP_JGT, JMP_JGE, JMP_JSET}
_JUMPS = _COND | {op | JMP_X for op in _COND}
_OTHER = {
    LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_W_IND, LD_H_IND, LD_B_IND, LD_W_LEN, LD_IMM,
    LD_MEM, LDX_IMM, LDX_MEM, LDX_W_LEN, LDX_B_MSH, ST, STX, RET_K, RET_A, TAX, TXA,
    JMP_JA,
}  # fmt: skip
OPCODES = frozenset(_ALU | _JUMPS | _OTHER)  # every opcode the interpreter runs
_MEMWORDS = 16
_M = 0xFFFFFFFF

# pcap-filter's DLT for link types whose DLT differs by platform (DLT_RAW is 12 on
# Linux, 14 on OpenBSD); pcap_open_dead wants the DLT, and refuses LINKTYPE_RAW.
_DLT_NAMES = {LINKTYPE_RAW: b"RAW"}
_PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


class FilterError(DataplaneError, ValueError):
    """A filter that libpcap refused (its message), or a BPF program that is invalid."""


@dataclass(frozen=True, slots=True)
class Insn:
    """One classic BPF instruction, as ``struct bpf_insn``."""

    code: int
    jt: int
    jf: int
    k: int


def _check(insns: tuple[Insn, ...]) -> None:
    n = len(insns)
    if not 0 < n <= 4096:
        raise FilterError(f"a BPF program has 1..4096 instructions, not {n}")
    for pc, i in enumerate(insns):
        if i.code not in OPCODES:
            raise FilterError(f"instruction {pc}: unsupported opcode {i.code:#06x}")
        if not (0 <= i.k <= _M and 0 <= i.jt <= 255 and 0 <= i.jf <= 255):
            raise FilterError(f"instruction {pc}: field out of range")
        if i.code in (LD_MEM, LDX_MEM, ST, STX) and i.k >= _MEMWORDS:
            raise FilterError(f"instruction {pc}: scratch memory index {i.k}")
        if i.code in (ALU_DIV, ALU_MOD) and i.k == 0:
            raise FilterError(f"instruction {pc}: division by constant 0")
        if i.code in (ALU_LSH, ALU_RSH) and i.k >= 32:  # C leaves it undefined
            raise FilterError(f"instruction {pc}: shift by constant {i.k}")
        if i.code == JMP_JA and pc + 1 + i.k >= n:
            raise FilterError(f"instruction {pc}: jump out of the program")
        if i.code in _JUMPS and pc + 1 + max(i.jt, i.jf) >= n:
            raise FilterError(f"instruction {pc}: jump out of the program")
    if insns[-1].code not in (RET_K, RET_A):
        raise FilterError("a BPF program must end in RET")


class Program:
    """A checked classic BPF program; ``match`` runs it on one packet."""

    __slots__ = ("_code", "expr", "insns")

    def __init__(self, insns: Iterable[Insn | tuple[int, int, int, int]], expr: str = "") -> None:
        self.insns = tuple(i if isinstance(i, Insn) else Insn(*i) for i in insns)
        self.expr = expr
        _check(self.insns)
        # (code, k, absolute true target, absolute false target): no arithmetic per jump.
        self._code = tuple(
            (i.code, i.k, pc + 1 + (i.k if i.code == JMP_JA else i.jt), pc + 1 + i.jf)
            for pc, i in enumerate(self.insns)
        )

    @classmethod
    def match_all(cls, snaplen: int = DEFAULT_SNAPLEN) -> Program:
        return cls([Insn(RET_K, 0, 0, snaplen)])

    @classmethod
    def from_ddd(cls, text: str, expr: str = "") -> Program:
        """Builds a program from ``tcpdump -ddd`` output (a count, then "code jt jf k")."""
        try:
            lines = [ln.split() for ln in text.strip().splitlines()]
            count = int(lines[0][0])
            insns = [Insn(*(int(f) for f in ln)) for ln in lines[1:]]
        except (ValueError, IndexError, TypeError) as exc:
            raise FilterError(f"not tcpdump -ddd output: {exc}") from None
        if count != len(insns):
            raise FilterError(f"tcpdump -ddd output says {count} instructions, has {len(insns)}")
        return cls(insns, expr)

    def __len__(self) -> int:
        return len(self.insns)

    def __repr__(self) -> str:
        return f"Program({self.expr!r}, {len(self.insns)} instructions)"

    def dump(self) -> str:
        """The program in ``tcpdump -ddd`` form."""
        return "\n".join(
            [str(len(self.insns))] + [f"{i.code} {i.jt} {i.jf} {i.k}" for i in self.insns]
        )

    def match(self, packet: bytes | memoryview, wire_len: int | None = None) -> bool:
        """True when the program accepts the packet (returns non-zero)."""
        return self.run(packet, wire_len) != 0

    def run(self, packet: bytes | memoryview, wire_len: int | None = None) -> int:
        """The program's return value (the snap length for a match, 0 for none).

        ``packet`` holds the captured bytes, ``wire_len`` the length on the wire
        (what ``len`` compares; default: the captured length).
        """
        p = packet if isinstance(packet, bytes) else bytes(packet)
        n = len(p)
        wlen = n if wire_len is None else wire_len & _M
        code = self._code
        a = x = 0
        mem = [0] * _MEMWORDS
        pc = 0
        while True:
            op, k, jt, jf = code[pc]
            pc += 1
            if op == LD_H_ABS:
                if k + 2 > n:
                    return 0
                a = (p[k] << 8) | p[k + 1]
            elif op == JMP_JEQ:
                pc = jt if a == k else jf
            elif op == LD_B_ABS:
                if k >= n:
                    return 0
                a = p[k]
            elif op == JMP_JSET:
                pc = jt if a & k else jf
            elif op == RET_K:
                return k
            elif op == LDX_B_MSH:
                if k >= n:
                    return 0
                x = (p[k] & 0xF) << 2
            elif op == LD_H_IND:
                o = x + k
                if o + 2 > n:
                    return 0
                a = (p[o] << 8) | p[o + 1]
            elif op == LD_W_ABS:
                if k + 4 > n:
                    return 0
                a = int.from_bytes(p[k : k + 4], "big")
            elif op == JMP_JGT:
                pc = jt if a > k else jf
            elif op == JMP_JGE:
                pc = jt if a >= k else jf
            elif op == ALU_AND:
                a &= k
            elif op == LD_B_IND:
                o = x + k
                if o >= n:
                    return 0
                a = p[o]
            elif op == LD_W_IND:
                o = x + k
                if o + 4 > n:
                    return 0
                a = int.from_bytes(p[o : o + 4], "big")
            elif op == RET_A:
                return a
            elif op == LD_W_LEN:
                a = wlen
            elif op == LDX_W_LEN:
                x = wlen
            elif op == LD_IMM:
                a = k
            elif op == LDX_IMM:
                x = k
            elif op == LD_MEM:
                a = mem[k]
            elif op == LDX_MEM:
                x = mem[k]
            elif op == ST:
                mem[k] = a
            elif op == STX:
                mem[k] = x
            elif op == TAX:
                x = a
            elif op == TXA:
                a = x
            elif op == JMP_JA:
                pc = jt
            elif op & 0x07 == 0x05:  # conditional jump on X
                c = op & ~JMP_X
                if c == JMP_JEQ:
                    pc = jt if a == x else jf
                elif c == JMP_JGT:
                    pc = jt if a > x else jf
                elif c == JMP_JGE:
                    pc = jt if a >= x else jf
                else:
                    pc = jt if a & x else jf
            else:  # ALU: _check let nothing else through
                if op == ALU_NEG:
                    a = -a & _M
                    continue
                v = x if op & ALU_X else k
                o = op & ~ALU_X
                if o == ALU_ADD:
                    a = (a + v) & _M
                elif o == ALU_SUB:
                    a = (a - v) & _M
                elif o == ALU_MUL:
                    a = (a * v) & _M
                elif o == ALU_DIV:
                    if v == 0:
                        return 0
                    a //= v
                elif o == ALU_MOD:
                    if v == 0:
                        return 0
                    a %= v
                elif o == ALU_OR:
                    a |= v
                elif o == ALU_AND:
                    a &= v
                elif o == ALU_XOR:
                    a ^= v
                elif o == ALU_LSH:
                    a = (a << v) & _M if v < 32 else 0
                else:  # ALU_RSH
                    a = a >> v if v < 32 else 0


_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class _BpfInsn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _BpfProgram(ctypes.Structure):
    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn)))


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        names = ["libpcap.so.0.8", ctypes.util.find_library("pcap"), "libpcap.so.1", "libpcap.so"]
        for name in names:
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
            except OSError:
                continue
            lib.pcap_open_dead.restype = ctypes.c_void_p
            lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
            lib.pcap_close.restype = None
            lib.pcap_close.argtypes = (ctypes.c_void_p,)
            lib.pcap_geterr.restype = ctypes.c_char_p
            lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
            lib.pcap_compile.restype = ctypes.c_int
            lib.pcap_compile.argtypes = (
                ctypes.c_void_p,
                ctypes.POINTER(_BpfProgram),
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_uint32,
            )
            lib.pcap_freecode.restype = None
            lib.pcap_freecode.argtypes = (ctypes.POINTER(_BpfProgram),)
            lib.pcap_datalink_name_to_val.restype = ctypes.c_int
            lib.pcap_datalink_name_to_val.argtypes = (ctypes.c_char_p,)
            _lib = lib
            break
        else:
            raise FilterError("libpcap not found (Debian: apt-get install libpcap0.8)")
    return _lib


def _pcap_compile(expr: str, linktype: int, snaplen: int, optimize: bool) -> list[Insn]:
    """The one call into libpcap: expression -> instructions, or libpcap's message."""
    with _lib_lock:  # pcap_compile's parser state is per handle, but be safe on old libpcap
        lib = _libpcap()
        dlt = linktype
        if linktype in _DLT_NAMES:
            dlt = lib.pcap_datalink_name_to_val(_DLT_NAMES[linktype])
        handle = lib.pcap_open_dead(dlt, snaplen)
        if not handle:
            raise FilterError(f"pcap_open_dead refused link type {linktype}")
        try:
            prog = _BpfProgram()
            rc = lib.pcap_compile(
                handle, ctypes.byref(prog), expr.encode(), int(optimize), _PCAP_NETMASK_UNKNOWN
            )
            if rc != 0:
                msg = lib.pcap_geterr(handle) or b"pcap_compile failed"
                raise FilterError(f"{expr!r}: {msg.decode(errors='replace')}")
            try:
                return [
                    Insn(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                         prog.bf_insns[i].k)
                    for i in range(prog.bf_len)
                ]  # fmt: skip
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)


def compile_filter(
    expr: str,
    linktype: int = LINKTYPE_RAW,
    snaplen: int = DEFAULT_SNAPLEN,
    *,
    optimize: bool = True,
) -> Program:
    """Compiles a pcap-filter expression for packets of ``linktype`` (default: raw IP).

    An empty expression matches everything (and needs no libpcap); one libpcap
    refuses raises :class:`FilterError` with libpcap's message.
    """
    if not expr.strip():
        return Program.match_all(snaplen)
    if not 0 < snaplen <= 0x7FFFFFFF:
        raise FilterError(f"snaplen {snaplen} out of range")
    return Program(_pcap_compile(expr, linktype, snaplen, optimize), expr)
