"""subnet.env, the file CNI's flannel plugin reads: rendered purely, written atomically."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SubnetEnv:
    """The four variables flanneld writes."""

    network: ipaddress.IPv4Network
    subnet: ipaddress.IPv4Network
    mtu: int
    ipmasq: bool

    def render(self) -> str:
        """FLANNEL_SUBNET is the subnet's first host address with its length, as flannel."""
        first = self.subnet.network_address + 1
        return (f"FLANNEL_NETWORK={self.network}\n"
                f"FLANNEL_SUBNET={first}/{self.subnet.prefixlen}\n"
                f"FLANNEL_MTU={self.mtu}\n"
                f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n")


def parse(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blanks and comments ignored."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip()] = value.strip()
    return out


def read_subnet(path: str) -> ipaddress.IPv4Network | None:
    """FLANNEL_SUBNET of an existing file as a network, or None if absent or unreadable."""
    try:
        with open(path) as f:
            value = parse(f.read()).get("FLANNEL_SUBNET")
    except (OSError, UnicodeDecodeError):  # a file that is not UTF-8 text is unreadable too
        return None
    if not value:
        return None
    try:
        return ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        return None


def previous(path: str) -> list[ipaddress.IPv4Network]:
    """The subnet an earlier run held (the keeper prefers it, so a restart keeps it)."""
    old = read_subnet(path)
    return [old] if old is not None else []


def write(path: str, env: SubnetEnv) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(env.render())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
