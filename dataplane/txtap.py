"""The tunnel-GSO transmit device: one write per ~64 KB, the kernel cuts the VXLAN datagrams.

On kernels >= 6.17 a TAP opened with ``IFF_VNET_HDR`` and a 24-byte
``virtio_net_hdr_v1_hash_tunnel`` (see :mod:`dataplane.tunnel_gso`) takes a
TCP super-packet already wrapped in outer IPv4/UDP/VXLAN/Ethernet headers and
segments it into ordinary VXLAN datagrams, inner and outer checksums included
(byte for byte what :func:`dataplane.tso.tso_split` would have built). The
frame enters the stack on this TAP and is forwarded out of the underlay
interface, so the device needs ``accept_local=1`` (the outer source is our own
address) and ``rp_filter=0``, the host ``ip_forward=1`` and a FORWARD chain that
lets it through (an ACCEPT rule for the TAP is installed when iptables' policy
is not ACCEPT). It must be a TAP: the kernel wants an Ethernet header in front
of the outer IP, which a TUN cannot carry.

:func:`probe` finds out whether all of that holds; the engine falls back to the
userspace split (and says why in ``/status``) when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence

import pytun
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dataplane import tunnel_gso as tg
from dataplane.errors import DeviceError

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
# Any address works; a device without one fails loose rp_filter. Link-local, no prefix route.
TAP_ADDRESS = "169.254.77.1"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
RP_FILTER_ALL = "/proc/sys/net/ipv4/conf/all/rp_filter"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def host_reason() -> str | None:
    """Why this host cannot forward what the TAP is given, or None if it can."""
    if _read(IP_FORWARD) != "1":
        return "net.ipv4.ip_forward is not 1 (the TAP's frames are forwarded to the underlay)"
    if _read(RP_FILTER_ALL) == "1":
        return "net.ipv4.conf.all.rp_filter is 1 (strict): the TAP's frames would be refused"
    return None


def _writev_closed(parts: Sequence[bytes | memoryview]) -> int:
    raise OSError(9, "device closed")


class TunnelTx:
    """A TAP taking tunnel-GSO super-packets: ``write([vnet hdr + L2 + outer, inner])``."""

    def __init__(self, name: str, mac: bytes, *,
                 writev: Callable[[Sequence[bytes | memoryview]], int] = _writev_closed) -> None:
        self.name = name
        self.mac = mac  # frames are addressed to the TAP itself: the stack takes them as ours
        self.l2 = tg.tap_header(mac, mac)
        self._writev = writev
        self._dev: pytun.TunTapDevice | None = None
        self._rule: list[str] | None = None

    @classmethod
    def open(cls, name: str, *, multi_queue: bool = False) -> TunnelTx:
        """Create the TAP with a 24-byte vnet header; DeviceError if the kernel lacks it."""
        flags = pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except (pytun.Error, OSError) as e:
            raise DeviceError(f"cannot create TAP {name}: {e}") from None
        fd = dev.fileno()
        os.set_inheritable(fd, False)
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", tg.VNET_HDR_TNL_LEN))
            # Older kernels refuse the tunnel bits (EINVAL): the feature test. They govern
            # reads only; writes are parsed by the 24-byte header size.
            fcntl.ioctl(fd, TUNSETOFFLOAD, tg.TUN_F_TUNNEL_PROBE)
        except OSError as e:
            dev.close()
            raise DeviceError(f"TAP {name}: the kernel has no UDP tunnel GSO for TUN/TAP "
                              f"({e.strerror}; needs Linux >= 6.17)") from None
        self = cls(dev.name, bytes(dev.hwaddr), writev=functools.partial(os.writev, fd))
        self._dev = dev
        return self

    async def configure(self) -> None:
        """Address, sysctls, up; an ACCEPT rule in FORWARD when its policy is not ACCEPT."""
        for key, value in (("accept_local", "1"), ("rp_filter", "0")):
            try:
                with open(f"/proc/sys/net/ipv4/conf/{self.name}/{key}", "w") as f:
                    f.write(value)
            except OSError as e:
                raise DeviceError(f"TAP {self.name}: cannot set {key}: {e.strerror}") from None
        with (contextlib.suppress(OSError),
              open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f):
            f.write("1")
        await asyncio.to_thread(_configure_link, self.name)
        self._rule = await asyncio.to_thread(_allow_forward, self.name)

    def write(self, parts: Sequence[bytes | memoryview]) -> bool:
        try:
            self._writev(parts)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._writev = _writev_closed
        if self._rule is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["iptables", "-D", *self._rule], capture_output=True, timeout=10)
            self._rule = None
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def header(self, inner: memoryview, gso_size: int, src: bytes, dst: bytes, dst_mac: bytes,
               own_mac: bytes, vni: int, sport: int, dport: int) -> bytes:
        """vnet header + TAP Ethernet + outer IPv4/UDP/VXLAN/Ethernet for one super-packet.

        ``sport``: the flow's outer source port (the engine gives the port of the UDP
        lane the flow's other packets leave from, so the flow keeps one 4-tuple).
        TTL 65: forwarding out of the underlay takes one off, so peers see 64.
        """
        return (tg.tunnel_vnet_hdr_for(inner, gso_size) + self.l2
                + tg.build_tunnel_prefix(src, dst, sport, vni, dst_mac, own_mac,
                                         len(inner), dst_port=dport, ttl=65))


def _configure_link(name: str) -> None:
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise DeviceError(f"TAP {name} vanished before it was configured")
            idx = found[0]
            ipr.addr("replace", index=idx, address=TAP_ADDRESS, prefixlen=32)
            ipr.link("set", index=idx, state="up")
    except (NetlinkError, OSError) as e:
        raise DeviceError(f"configuring TAP {name}: {e}") from None


def forward_rule(name: str) -> list[str]:
    """The iptables FORWARD rule that lets the TAP's frames through (`flannelette cleanup`
    removes it too)."""
    return ["FORWARD", "-i", name, "-j", "ACCEPT", "-m", "comment", "--comment",
            "flannelette tunnel GSO"]


def remove_forward_rule(name: str) -> bool:
    """Delete every copy of :func:`forward_rule`; True if one was there."""
    if shutil.which("iptables") is None:
        return False
    found = False
    for _ in range(64):  # bounded: one copy per worker at most
        res = subprocess.run(["iptables", "-D", *forward_rule(name)], capture_output=True,
                             timeout=10)
        if res.returncode != 0:
            break
        found = True
    return found


def _allow_forward(name: str) -> list[str] | None:
    """With iptables' FORWARD policy not ACCEPT, let the TAP's frames through; the rule."""
    if shutil.which("iptables") is None:
        return None
    try:
        out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or "-P FORWARD ACCEPT" in out.stdout:
        return None
    rule = forward_rule(name)
    if subprocess.run(["iptables", "-C", *rule], capture_output=True,
                      timeout=10).returncode == 0:
        return None  # another queue of this TAP (a worker) installed it and owns it
    res = subprocess.run(["iptables", "-I", *rule], capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise DeviceError(f"TAP {name}: FORWARD policy drops and the ACCEPT rule failed: "
                          f"{res.stderr.strip()}")
    return rule

