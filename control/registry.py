"""The Registry: the one interface the agent uses to talk to etcd, v2 or v3.

Two implementations (``etcd_v2.py`` on python-etcd, ``etcd_v3.py`` on aetcd)
hide the API differences; tests add an in-memory one with a fake clock. This
module holds the protocol, its records, the endpoint options, and the
``--etcd-api auto`` discovery that ends flannel's "Key not found" confusion.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from control.errors import ConfigNotFound, FlagError, RegistryError, RegistryUnavailable
from control.lease import RawLease

log = logging.getLogger("flannelette.registry")

EXAMPLE_CONFIG = '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change under ``<prefix>/subnets``; ``value`` None means the lease went away."""

    subnet: ipaddress.IPv4Network
    value: str | None
    expiration: float | None = None


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """Every lease, and the cursor (v2 etcd index, v3 revision) the list was taken at."""

    leases: tuple[RawLease, ...]
    cursor: int


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events after a cursor, and the cursor to continue from."""

    events: tuple[WatchEvent, ...]
    cursor: int


@dataclass(frozen=True, slots=True)
class ConfigEvent:
    """The config key after a cursor: ``changed`` False means the wait timed out;
    ``value`` None means the key was deleted (or is absent)."""

    changed: bool
    value: str | None
    cursor: int


@dataclass(frozen=True, slots=True)
class EtcdOptions:
    """How to reach etcd: flanneld's --etcd-* flags."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")
    prefix: str = "/coreos.com/network"
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 5.0  # per request; the watch uses its own, finite, timeout

    def hosts(self) -> list[tuple[str, str, int]]:
        """(scheme, host, port) per endpoint; FlagError on a malformed one."""
        out = []
        for ep in self.endpoints:
            url = urllib.parse.urlsplit(ep if "://" in ep else f"http://{ep}")
            if url.scheme not in ("http", "https") or not url.hostname:
                raise FlagError(f"--etcd-endpoints: cannot use {ep!r} (want http://host:port)")
            try:
                port = url.port or 2379
            except ValueError:
                raise FlagError(f"--etcd-endpoints: bad port in {ep!r}") from None
            out.append((url.scheme, url.hostname, port))
        if not out:
            raise FlagError("--etcd-endpoints is empty")
        return out

    @property
    def tls(self) -> bool:
        return bool(self.cafile or self.certfile or self.keyfile) or any(
            ep.startswith("https://") for ep in self.endpoints)


class Registry(Protocol):
    """What the agent needs from etcd. Every method raises RegistryUnavailable when
    etcd cannot be reached (the caller backs off) and ResyncRequired when a watch
    cursor is too old (the caller re-lists)."""

    api: str  # "v2" or "v3"

    async def get_config(self) -> str | None:
        """The raw text of ``<prefix>/config``, or None if the key does not exist."""
        ...

    async def list_leases(self) -> LeaseSnapshot:
        """Every key under ``<prefix>/subnets`` that names a subnet."""
        ...

    async def create_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                           ) -> float | None:
        """Create the key only if absent; its expiry (unix s), or None if it exists."""
        ...

    async def put_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int) -> float:
        """Write the key unconditionally with a TTL (reusing our own lease); its expiry."""
        ...

    async def renew_lease(self, subnet: ipaddress.IPv4Network, value: str, ttl: int
                          ) -> float | None:
        """Rewrite the key with a fresh TTL only if it still holds ``value``; its expiry,
        or None when the lease is gone or was taken by someone else."""
        ...

    async def delete_lease(self, subnet: ipaddress.IPv4Network) -> None:
        """Delete the key (absent is fine)."""
        ...

    async def watch_leases(self, cursor: int, timeout: float) -> WatchBatch:
        """Events after ``cursor``, waiting at most ``timeout`` s (then an empty batch)."""
        ...

    async def close(self) -> None:
        ...


@runtime_checkable
class ConfigWatch(Protocol):
    """Watching ``<prefix>/config`` for live reconfiguration (both etcd registries).

    Separate from :class:`Registry` so registries that cannot watch the config
    (e.g. the tests' in-memory one) still are Registries; the agent checks."""

    async def get_config_rev(self) -> tuple[str | None, int]:
        """The config text (None if absent) and the cursor to watch from."""
        ...

    async def watch_config(self, cursor: int, timeout: float) -> ConfigEvent:
        """The first change of the config key after ``cursor``, waiting at most
        ``timeout`` s (then ``changed`` is False). ResyncRequired: read again."""
        ...


def open_api(api: str, options: EtcdOptions) -> Registry:
    """A registry for one API ("v2" or "v3"). Nothing is contacted yet."""
    if api == "v2":
        from control.etcd_v2 import EtcdV2Registry
        return EtcdV2Registry(options)
    if api == "v3":
        from control.etcd_v3 import EtcdV3Registry
        return EtcdV3Registry(options)
    raise FlagError(f"--etcd-api must be auto, v2 or v3, got {api!r}")


def not_found_message(options: EtcdOptions, looked_in: tuple[str, ...]) -> str:
    """Where we looked, and the exact etcdctl command that creates the config per API."""
    key = f"{options.prefix.rstrip('/')}/config"
    ep = ",".join(options.endpoints)
    lines = [f"no network config at {key} in the etcd {' or '.join(looked_in)} key space "
             f"(endpoints {ep}); etcd keeps v2 and v3 keys apart. Create it with:"]
    if "v3" in looked_in:
        lines.append(f"  ETCDCTL_API=3 etcdctl --endpoints {ep} put {key} '{EXAMPLE_CONFIG}'")
    if "v2" in looked_in:
        lines.append(f"  ETCDCTL_API=2 etcdctl --endpoints {ep} set {key} '{EXAMPLE_CONFIG}'"
                     "   (v2 needs etcd started with --enable-v2=true)")
    return "\n".join(lines)


async def discover(api: str, options: EtcdOptions) -> tuple[Registry, str]:
    """Open the registry for ``api`` and read the config; with "auto", use the API
    whose key space holds it (v3 first, as flannel >= 0.18). Raises ConfigNotFound
    (with the etcdctl commands), RegistryUnavailable or FlagError."""
    apis = ("v3", "v2") if api == "auto" else (api,)
    if api not in ("auto", "v2", "v3"):
        raise FlagError(f"--etcd-api must be auto, v2 or v3, got {api!r}")
    found: list[tuple[Registry, str]] = []
    unavailable: list[str] = []
    for name in apis:
        reg = open_api(name, options)
        try:
            text = await reg.get_config()
        except RegistryUnavailable as exc:
            unavailable.append(f"{name}: {exc}")
            await reg.close()
            continue
        except RegistryError as exc:  # e.g. v2 not served by this etcd
            log.debug("etcd %s API: %s", name, exc)
            await reg.close()
            continue
        if text is None:
            await reg.close()
            continue
        found.append((reg, text))
        if api == "auto":
            break
    if found:
        reg, text = found[0]
        if api == "auto":
            log.info("etcd API: %s (the network config is in the %s key space)", reg.api, reg.api)
        return reg, text
    if unavailable:
        raise RegistryUnavailable("; ".join(unavailable))
    raise ConfigNotFound(not_found_message(options, apis))
