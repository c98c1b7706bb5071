"""The network config at ``<prefix>/config``, parsed exactly as flannel parses it.

Pure: text in, a frozen :class:`NetworkConfig` out, or one :class:`ConfigError`
naming the field and the value. Field names are matched case-insensitively, as
Go's ``encoding/json`` does (``"Directrouting"`` is ``DirectRouting``), and the
backend type is matched case-insensitively (``"VxLAN"`` is vxlan). Defaults and
rules, and their messages, are flannel's (``pkg/subnet/config.go``).
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.errors import ConfigError
from dataplane.wire import OVERHEAD, VXLAN_PORT

MAX_VNI = (1 << 24) - 1


class BackendType(enum.StrEnum):
    """The backends flannelette runs. A StrEnum, so lease values and logs keep flannel's
    strings (``"vxlan"``, ``"host-gw"``) and a peer's lease string compares equal."""

    VXLAN = "vxlan"
    HOST_GW = "host-gw"

    @classmethod
    def parse(cls, text: str) -> BackendType | None:
        """Flannel matches the type case-insensitively (``"VxLAN"`` is vxlan); None if
        it is not one of ours."""
        try:
            return cls(text.lower())
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Backend:
    """The ``Backend`` object: type plus the vxlan options flannel knows."""

    type: BackendType
    vni: int = 1
    port: int = VXLAN_PORT
    mtu: int | None = None  # None: external interface MTU minus the overhead
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A validated network config with flannel's defaults filled in."""

    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend: Backend
    enable_ipv4: bool = True
    enable_ipv6: bool = False

    def mtu_for(self, iface_mtu: int) -> int:
        """The overlay MTU for an external interface MTU (Backend.MTU wins if set)."""
        if self.backend.mtu is not None:
            return self.backend.mtu
        if self.backend.type is BackendType.VXLAN:
            return iface_mtu - OVERHEAD
        return iface_mtu

    def contains_subnet(self, subnet: ipaddress.IPv4Network) -> bool:
        """True if ``subnet`` is one flannel could lease under this config."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)


def fold_keys(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Lower-case the keys; a later duplicate wins, as in Go's decoder."""
    return {k.lower(): v for k, v in obj.items()}


def _bool(fields: Mapping[str, Any], key: str, name: str, default: bool) -> bool:
    if key not in fields or fields[key] is None:
        return default
    value = fields[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _int(fields: Mapping[str, Any], key: str, name: str, default: int | None
         ) -> int | None:
    if key not in fields or fields[key] is None:
        return default
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return value


def _address(fields: Mapping[str, Any], key: str, name: str) -> ipaddress.IPv4Address | None:
    value = fields.get(key)
    if value is None or value == "":
        return None
    try:
        addr = ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError):
        raise ConfigError(f"{name} must be an IPv4 address, got {value!r}") from None
    return None if int(addr) == 0 else addr  # flannel treats 0.0.0.0 as "unset"


def _network(fields: Mapping[str, Any]) -> ipaddress.IPv4Network:
    value = fields.get("network")
    if value is None or value == "":
        raise ConfigError("please define a correct Network parameter in the flannel config")
    if not isinstance(value, str):
        raise ConfigError(f"Network must be a CIDR string, got {value!r}")
    try:
        # Go's net.ParseCIDR accepts host bits and masks them off.
        net = ipaddress.IPv4Network(value, strict=False)
    except ValueError:
        raise ConfigError(f"Network must be an IPv4 CIDR such as 10.5.0.0/16, got {value!r}"
                          ) from None
    if "/" not in value:
        raise ConfigError(f"Network must be an IPv4 CIDR such as 10.5.0.0/16, got {value!r}")
    return net


def _backend(raw: Any) -> Backend:
    if raw is None:
        raise ConfigError(
            "backend type udp (flannel's default when the config has no Backend) is not "
            'supported by flannelette; add "Backend": {"Type": "vxlan"} or {"Type": "host-gw"}')
    if not isinstance(raw, dict):
        raise ConfigError(f"error decoding Backend property of config: expected an object, "
                          f"got {raw!r}")
    fields = fold_keys(raw)
    btype = fields.get("type", "")
    if not isinstance(btype, str):
        raise ConfigError(f"Backend.Type must be a string, got {btype!r}")
    if btype.lower() == "udp":
        raise ConfigError(
            "backend type udp (flannel's old userspace encapsulation) is not supported by "
            'flannelette; use "Type": "vxlan" (userspace VXLAN, wire-compatible with '
            'flannel\'s vxlan) or "host-gw"')
    kind = BackendType.parse(btype)
    if kind is None:
        raise ConfigError(f"unknown backend type: {btype}"
                          f" (flannelette supports: {', '.join(BackendType)})")
    if kind is BackendType.HOST_GW:
        return Backend(type=kind, port=0)
    vni = _int(fields, "vni", "Backend.VNI", 1)
    port = _int(fields, "port", "Backend.Port", 0)
    mtu = _int(fields, "mtu", "Backend.MTU", None)
    assert vni is not None and port is not None
    if not 0 <= vni <= MAX_VNI:
        raise ConfigError(f"Backend.VNI must be in 0..{MAX_VNI}, got {vni}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"Backend.Port must be in 0..65535, got {port}")
    if mtu is not None and mtu != 0 and not 576 <= mtu <= 65535:
        raise ConfigError(f"Backend.MTU must be in 576..65535, got {mtu}")
    return Backend(
        type=kind, vni=vni, port=port or VXLAN_PORT, mtu=mtu or None,
        gbp=_bool(fields, "gbp", "Backend.GBP", False),
        learning=_bool(fields, "learning", "Backend.Learning", False),
        direct_routing=_bool(fields, "directrouting", "Backend.DirectRouting", False),
    )


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate a network config as flanneld does; raise ConfigError."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the network config is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level: "[[[[..." (fuzzing)
        raise ConfigError("the network config is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"the network config must be a JSON object, got {doc!r}")
    fields = fold_keys(doc)
    enable_ipv4 = _bool(fields, "enableipv4", "EnableIPv4", True)
    enable_ipv6 = _bool(fields, "enableipv6", "EnableIPv6", False)
    if enable_ipv6:
        raise ConfigError("EnableIPv6 is true, but flannelette supports IPv4 networks only")
    if not enable_ipv4:
        raise ConfigError("EnableIPv4 is false, but flannelette supports IPv4 networks only")
    network = _network(fields)
    subnet_len = _int(fields, "subnetlen", "SubnetLen", 0) or 0
    if subnet_len < 0:
        raise ConfigError(f"SubnetLen must be a prefix length, got {subnet_len}")
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError(f"SubnetLen must be less than /31 (got /{subnet_len})")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"network must be able to accommodate at least four subnets "
                f"(Network {network}, SubnetLen /{subnet_len})")
    elif network.prefixlen > 28:
        raise ConfigError(f"network is too small. Minimum useful network prefix is /28 "
                          f"(Network {network})")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    subnet_min = _address(fields, "subnetmin", "SubnetMin")
    if subnet_min is None:
        subnet_min = network.network_address + size
    elif subnet_min not in network:
        raise ConfigError(f"SubnetMin is not in the range of the Network: {subnet_min}")
    subnet_max = _address(fields, "subnetmax", "SubnetMax")
    if subnet_max is None:
        subnet_max = ipaddress.IPv4Address(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError(f"SubnetMax is not in the range of the Network: {subnet_max}")
    if int(subnet_min) % size:
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) % size:
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    backend = _backend(fields.get("backend"))
    return NetworkConfig(network, subnet_len, subnet_min, subnet_max, backend,
                         enable_ipv4, enable_ipv6)
