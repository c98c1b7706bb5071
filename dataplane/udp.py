"""The UDP socket on PublicIP:8472. Thin I/O: open, size the buffers, nothing else.

The socket stays *blocking* for sends (a full send buffer briefly stalls the
loop instead of dropping, which TCP inside the tunnel prefers) and the engine
reads it with ``MSG_DONTWAIT`` so a drain loop ends at the first empty read.
"""

from __future__ import annotations

import socket

from dataplane.errors import DeviceError

BUFFER_BYTES = 4 << 20
SO_SNDBUFFORCE = 32  # Linux; missing from Python 3.11's socket module
SO_RCVBUFFORCE = 33


def open_udp(address: str, port: int, buffer_bytes: int = BUFFER_BYTES) -> socket.socket:
    """A UDP socket bound to ``address:port`` with large kernel buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                             (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
            except OSError:  # not root: the plain option, capped by rmem_max/wmem_max
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise DeviceError(f"cannot bind UDP {address}:{port}: {e.strerror}") from None
    return sock
