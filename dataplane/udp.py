"""The UDP endpoint on PublicIP:8472: UDP GSO sends, UDP GRO receives, and their fallbacks.

The endpoint owns every socket option and control message, so the engine's
loops never see a cmsg (wireguard-go's ``conn/bind_std.go`` shape):

- :meth:`UdpEndpoint.send_run` sends back-to-back datagrams of one size (the
  last may be shorter) in one ``sendmsg`` with ``UDP_SEGMENT``, at most 64
  datagrams / 65507 bytes per call, and falls back to one ``sendto`` per
  datagram for good when the kernel refuses GSO (EIO/EINVAL/EOPNOTSUPP);
- :meth:`UdpEndpoint.recv` returns one datagram or, with ``UDP_GRO``, a batch
  of same-size datagrams from one sender and their segment size;
- *source lanes*: besides the socket bound to PublicIP:8472 (lane 0), ``open``
  binds ``source_ports`` send-only sockets to PublicIP and an ephemeral port
  each (a filter drops anything sent to them). The engine sends each inner
  flow from the lane its flow hash picks, so a flow keeps one outer source
  port while different flows differ, as the kernel's VXLAN spreads them
  (``udp_flow_src_port``): a receiver's RSS queues or ``SO_REUSEPORT`` workers
  then share the flows of one sender. Every send method takes the lane.

The socket stays *blocking* for sends (a full send buffer briefly stalls the
loop instead of dropping, which TCP inside the tunnel prefers) and is read with
``MSG_DONTWAIT`` so a drain loop ends at the first empty read. The system calls
are reached through the callables given to the constructor (and ``add_lane``), which
is all a fake endpoint replaces.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

from dataplane.errors import DeviceError

BUFFER_BYTES = 4 << 20
SO_SNDBUFFORCE = 32  # Linux; missing from Python 3.11's socket module
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
SOL_UDP = 17
UDP_SEGMENT = 103  # missing from Python 3.11's socket module
UDP_GRO = 104
GSO_MAX_SEGS = 64
UDP_MAX = 65507
_CMSG_GRO = socket.CMSG_SPACE(4)
_NO_GSO = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP)
_SEG = struct.Struct("=H")
_INT = struct.Struct("=i")
MAX_SOURCE_PORTS = 64

Address = tuple[str, int]
RecvMsg = Callable[[list[memoryview], int, int], tuple[int, list[tuple[int, int, bytes]], int,
                                                        Any]]
SendMsg = Callable[[list[memoryview], list[tuple[int, int, bytes]], int, Address], int]
SendTo = Callable[[memoryview | bytes, Address], int]


def _closed(*_: object) -> Any:
    raise OSError(errno.EBADF, "endpoint closed")


def _drop_all(sock: socket.socket) -> None:
    """Attach a one-instruction classic BPF program (``ret #0``) to a send-only socket:
    nothing sent to its port is ever queued (nobody reads it)."""
    insn = ctypes.create_string_buffer(struct.pack("=HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K
    prog = struct.pack("@HP", 1, ctypes.addressof(insn))  # struct sock_fprog (native)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def _send_socket(address: str, buffer_bytes: int) -> socket.socket:
    """A socket bound to ``address`` and an ephemeral port, for sending only."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, buffer_bytes)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.bind((address, 0))
        _drop_all(sock)
    except OSError:
        sock.close()
        raise
    return sock


class UdpEndpoint:
    """A UDP socket for VXLAN datagrams, sent in GSO runs and received in GRO batches."""

    def __init__(self, *, gro: bool = False, gso: bool = True, recvmsg: RecvMsg = _closed,
                 sendmsg: SendMsg = _closed, sendto: SendTo = _closed, fd: int = -1) -> None:
        self.gro = gro  # receives may return batches
        self.gso = gso  # cleared for good when the kernel refuses UDP_SEGMENT
        self._recvmsg = recvmsg
        self._fd = fd
        self._sock: socket.socket | None = None
        # Lane 0 sends from the bound socket; add_lane appends the source-port lanes.
        self._lanes: list[tuple[SendMsg, SendTo]] = [(sendmsg, sendto)]
        self.ports: list[int] = [0]  # the source port of each lane (0: not known)
        self._lane_socks: list[socket.socket] = []
        self.last_error = 0  # errno of the last failed receive
        self.gso_sends = 0  # UDP GSO calls that carried a run

    @property
    def lanes(self) -> int:
        """Send lanes: 1 (the bound socket) + the source-port lanes."""
        return len(self._lanes)

    def add_lane(self, sendmsg: SendMsg, sendto: SendTo, port: int) -> None:
        """One more send lane, whose datagrams leave from source ``port``."""
        self._lanes.append((sendmsg, sendto))
        self.ports.append(port)

    @classmethod
    def open(cls, address: str, port: int, buffer_bytes: int = BUFFER_BYTES, *,
             gro: bool = True, gso: bool = True, reuseport: bool = False,
             source_ports: int = 0) -> UdpEndpoint:
        """Bind ``address:port`` with large kernel buffers; GRO if asked and available.

        ``reuseport``: ``SO_REUSEPORT``, one socket per worker on the same port (the
        kernel spreads senders over them by the 4-tuple hash). ``source_ports``:
        that many send lanes on ephemeral ports (see the module docstring).
        """
        if not 0 <= source_ports <= MAX_SOURCE_PORTS:
            raise DeviceError(f"source ports must be in 0..{MAX_SOURCE_PORTS}, "
                              f"got {source_ports}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                                 (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
                except OSError:  # no CAP_NET_ADMIN: the plain option, capped by rmem_max
                    sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
            sock.bind((address, port))
        except OSError as e:
            sock.close()
            raise DeviceError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
        if gro:
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            except OSError:
                gro = False  # an old kernel: one datagram per receive
        self = cls(gro=gro, gso=gso, recvmsg=sock.recvmsg_into, sendmsg=sock.sendmsg,
                   sendto=sock.sendto, fd=sock.fileno())
        self._sock = sock
        self.ports[0] = port
        try:
            for _ in range(source_ports):
                lane = _send_socket(address, buffer_bytes)
                self._lane_socks.append(lane)
                self.add_lane(lane.sendmsg, lane.sendto, lane.getsockname()[1])
        except OSError as e:
            self.close()
            raise DeviceError(f"cannot open a UDP source-port socket on {address}: "
                              f"{e.strerror}") from None
        return self

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._recvmsg = _closed
        self._lanes = [(_closed, _closed) for _ in self._lanes]
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for lane in self._lane_socks:
            lane.close()
        self._lane_socks = []
        self._fd = -1

    # ---- receive ------------------------------------------------------------------------
    def recv(self, bufs: list[memoryview]) -> tuple[int, int, str, int]:
        """One receive into ``bufs[0]``: (bytes, segment size, source address, port).

        The segment size equals the byte count for a single datagram; with GRO a
        batch holds datagrams of that size back to back (the last may be
        shorter). Bytes is -1 when nothing is ready, -2 when the call failed
        (``last_error`` says why).
        """
        try:
            n, anc, _, addr = self._recvmsg(bufs, _CMSG_GRO, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return -1, 0, "", 0
        except OSError as e:
            self.last_error = e.errno or 0
            return -2, 0, "", 0
        step = n
        if anc:
            level, kind, data = anc[0]
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                step = _INT.unpack_from(data)[0] or n
        return n, step, addr[0], addr[1]

    # ---- send ---------------------------------------------------------------------------
    def send(self, data: memoryview | bytes, addr: Address, lane: int = 0) -> bool:
        """One datagram; False if the kernel refused it."""
        try:
            self._lanes[lane][1](data, addr)
        except OSError:
            return False
        return True

    def send_parts(self, parts: list[memoryview], seglen: int, total: int, addr: Address,
                   lane: int = 0) -> tuple[int, int]:
        """Send ``parts`` (datagrams of ``seglen`` bytes, the last may be shorter; at
        most 64 and 65507 bytes in all) as one UDP GSO call over an iovec. Returns
        (datagrams sent, their bytes); per datagram when the kernel refuses GSO."""
        sendmsg, sendto = self._lanes[lane]
        if len(parts) == 1:
            try:
                sendto(parts[0], addr)
            except OSError:
                return 0, 0
            return 1, total
        if self.gso:
            try:
                sendmsg(parts, [(SOL_UDP, UDP_SEGMENT, _SEG.pack(seglen))], 0, addr)
                self.gso_sends += 1
                return len(parts), total
            except OSError as e:
                if e.errno not in _NO_GSO:
                    return 0, 0
                self.gso = False
        sent = nbytes = 0
        for part in parts:
            try:
                sendto(part, addr)
                sent += 1
                nbytes += len(part)
            except OSError:
                pass
        return sent, nbytes

    def send_run(self, view: memoryview, seglen: int, addr: Address, lane: int = 0
                 ) -> tuple[int, int]:
        """Send ``view`` as datagrams of ``seglen`` bytes (the last may be shorter).

        Returns (datagrams sent, their bytes). UDP GSO while the kernel takes
        it (``gso_sends`` counts the calls); a refused GSO call is retried per
        datagram and GSO stays off from then on.
        """
        sendmsg, sendto = self._lanes[lane]
        used = len(view)
        if used <= seglen:
            try:
                sendto(view, addr)
            except OSError:
                return 0, 0
            return 1, used
        per_call = min(GSO_MAX_SEGS, UDP_MAX // seglen) * seglen
        sent = nbytes = 0
        off = 0
        while off < used:
            end = min(used, off + per_call)
            if self.gso:
                try:
                    sendmsg([view[off:end]], [(SOL_UDP, UDP_SEGMENT, _SEG.pack(seglen))],
                            0, addr)
                    self.gso_sends += 1
                    sent += -(-(end - off) // seglen)
                    nbytes += end - off
                    off = end
                    continue
                except OSError as e:
                    if e.errno not in _NO_GSO:
                        off = end  # the whole chunk is lost; the caller counts it
                        continue
                    self.gso = False  # no UDP GSO here: one datagram per segment from now on
            while off < end:
                stop = min(off + seglen, end)
                try:
                    sendto(view[off:stop], addr)
                    sent += 1
                    nbytes += stop - off
                except OSError:
                    pass
                off = stop
        return sent, nbytes

