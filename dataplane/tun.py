"""The TUN device: open it (ioctl), configure it (iproute2). Thin I/O, no packet logic.

Opened directly with ``TUNSETIFF`` rather than through python-pytun because the
engine needs ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD``, which pytun does not wrap.
The device is not persistent: closing the descriptor deletes it, and with it
every address and route on it, so a crashed engine leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from collections.abc import Sequence

from dataplane.errors import DeviceError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


def open_tun(name: str, vnet_hdr: bool = True) -> tuple[int, str]:
    """Create TUN ``name`` (IFF_TUN|IFF_NO_PI[|IFF_VNET_HDR]); return (non-blocking fd, name)."""
    if not name or len(name.encode()) > 15:
        raise DeviceError(f"TUN name must be 1..15 bytes, got {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DeviceError(f"cannot open /dev/net/tun: {e.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise DeviceError(f"cannot create TUN {name}: {e.strerror}") from None
    return fd, res[:16].rstrip(b"\x00").decode()


def set_offload(fd: int, flags: int) -> None:
    """TUNSETOFFLOAD: which offloads userspace accepts on reads (TSO super-packets)."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        raise DeviceError(f"TUNSETOFFLOAD {flags:#x} refused: {e.strerror}") from None


async def ip(*args: str) -> None:
    """Run one ``ip`` command; DeviceError with its stderr if it fails."""
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise DeviceError(f"ip {' '.join(args)}: {err.decode().strip()}")


async def configure(name: str, address: str, mtu: int, txqueuelen: int | None) -> None:
    """Address (``a.b.c.d/32``), MTU, queue length, no IPv6 chatter, and up."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # IPv6 disabled or absent: nothing to silence
    await ip("addr", "replace", address, "dev", name)
    link: list[str] = ["link", "set", "dev", name, "mtu", str(mtu)]
    if txqueuelen is not None:
        link += ["txqueuelen", str(txqueuelen)]
    await ip(*link, "up")


async def replace_routes(name: str, subnets: Sequence[str]) -> None:
    """Route each subnet into the TUN (only the standalone runner does this)."""
    for subnet in subnets:
        await ip("route", "replace", subnet, "dev", name)
