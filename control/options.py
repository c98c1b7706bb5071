"""`flannelette run`'s flags: flanneld's names, each defaulting to FLANNELD_<FLAG>.

Pure: argv and an environment in, a frozen :class:`AgentOptions` out, or one
:class:`FlagError` naming the flag. argparse checks ``choices`` on the command
line only, so values that came from FLANNELD_* variables are checked here too.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from control.errors import FlagError
from control.lease import LEASE_TTL
from control.registry import EtcdOptions

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"


@dataclass(frozen=True, slots=True)
class AgentOptions:
    """Every flag of `flannelette run`, after FLANNELD_* defaults were applied."""

    etcd: EtcdOptions
    etcd_api: str = "auto"
    iface: tuple[str, ...] = ()
    public_ip: ipaddress.IPv4Address | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    renew_margin: float = 3600.0  # seconds
    lease_ttl: int = LEASE_TTL
    ip_masq: bool = False
    healthz_ip: str = "127.0.0.1"
    healthz_port: int = 9480
    log_level: str = "info"
    log_format: str = "text"
    watch_timeout: float = 10.0
    engine_offload: bool = True
    tunnel_gso: str = "auto"  # auto | on | off (with engine_offload)
    inner_source_check: bool = True
    workers: int = 1  # engine processes (1: in-process)
    source_ports: int = 8  # send lanes on ephemeral outer source ports (0: all from 8472)


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits on a bad flag; we want one FlagError line instead."""

    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def _env(environ: Mapping[str, str], flag: str) -> str | None:
    return environ.get("FLANNELD_" + flag.upper().replace("-", "_"))


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """flanneld's flag names; each default comes from FLANNELD_<FLAG> if set."""
    p = _Parser(prog="flannelette run", description="Run the flannelette node agent "
                "(flanneld's flags; each also from FLANNELD_<FLAG>, e.g. FLANNELD_IFACE).")

    def d(flag: str, default: str) -> str:
        return _env(environ, flag) or default

    p.add_argument("--etcd-endpoints", default=d("etcd-endpoints", DEFAULT_ENDPOINTS),
                   help="comma-separated etcd endpoints")
    p.add_argument("--etcd-prefix", default=d("etcd-prefix", "/coreos.com/network"))
    p.add_argument("--etcd-api", default=d("etcd-api", "auto"), choices=("auto", "v2", "v3"),
                   help="etcd API; auto = the one whose key space holds the config")
    for name in ("cafile", "certfile", "keyfile", "username", "password"):
        p.add_argument(f"--etcd-{name}", default=d(f"etcd-{name}", ""))
    p.add_argument("--iface", action="append", default=None,
                   help="interface name or address for inter-host traffic (repeatable)")
    p.add_argument("--public-ip", default=d("public-ip", ""),
                   help="the address other nodes reach us at (default: --iface's address)")
    p.add_argument("--subnet-file", default=d("subnet-file", "/run/flannel/subnet.env"))
    p.add_argument("--subnet-lease-renew-margin", type=float,
                   default=float(d("subnet-lease-renew-margin", "60")),
                   help="minutes before expiry to renew the lease (fractions allowed)")
    p.add_argument("--subnet-lease-ttl", type=int, default=int(d("subnet-lease-ttl",
                                                                  str(LEASE_TTL))),
                   help="lease TTL in seconds (flannel: 86400; shorter only for tests)")
    p.add_argument("--ip-masq", action="store_true",
                   default=_truthy(d("ip-masq", "false")),
                   help="masquerade traffic leaving the overlay network")
    p.add_argument("--healthz-ip", default=d("healthz-ip", "127.0.0.1"))
    p.add_argument("--healthz-port", type=int, default=int(d("healthz-port", "9480")),
                   help="port of /healthz, /readyz, /status, /metrics; 0 = off")
    p.add_argument("--log-level", default=d("log-level", "info"),
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    p.add_argument("--log-format", default=d("log-format", "text"), choices=("text", "json"),
                   help="text lines or JSON lines (one object per line)")
    p.add_argument("--engine-offload", default=d("engine-offload", "on"), choices=("on", "off"),
                   help="TUN TSO: the engine reads 64 KB TCP super-packets and has the kernel "
                        "cut them after encapsulation (--tunnel-gso) or cuts them itself "
                        "(partial checksums to flannelette peers, full ones to kernel peers); "
                        "default on, the fastest (docs/benchmarks.md); off: one packet per read")
    p.add_argument("--tunnel-gso", default=d("tunnel-gso", "auto"), choices=("auto", "on", "off"),
                   help="with --engine-offload on: TCP super-packets wrapped once and cut by "
                        "the kernel through a TAP (Linux >= 6.17); auto = when the kernel and "
                        "host allow it, else the userspace split")
    p.add_argument("--inner-source-check", default=d("inner-source-check", "on"),
                   choices=("on", "off"),
                   help="drop a peer's VXLAN datagrams whose inner IPv4 source is outside that "
                        "peer's subnet (default on; off only for debugging)")
    p.add_argument("--workers", type=int, default=int(d("workers", "1")),
                   help="engine processes sharing a multi-queue TUN and SO_REUSEPORT sockets "
                        "(default 1: in-process; see docs/operations.md)")
    p.add_argument("--source-ports", type=int, default=int(d("source-ports", "8")),
                   metavar="N",
                   help="send each inner flow from one of N ephemeral outer UDP source ports "
                        "(by flow hash), so receivers' RSS queues and workers spread flows as "
                        "with the kernel's VXLAN (default 8; 0: all from port 8472)")
    p.add_argument("--watch-timeout", type=float, default=float(d("watch-timeout", "10")),
                   help=argparse.SUPPRESS)
    p.add_argument("--etcd-timeout", type=float, default=float(d("etcd-timeout", "5")),
                   help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> AgentOptions:
    """Flags (and FLANNELD_* variables) -> AgentOptions; FlagError on anything unusable."""
    try:
        ns = build_parser(environ).parse_args(list(argv))
    except ValueError as exc:  # a FLANNELD_* number that is not one
        raise FlagError(f"bad FLANNELD_* value: {exc}") from None
    endpoints = tuple(e.strip() for e in ns.etcd_endpoints.split(",") if e.strip())
    etcd = EtcdOptions(endpoints=endpoints, prefix=ns.etcd_prefix, cafile=ns.etcd_cafile,
                       certfile=ns.etcd_certfile, keyfile=ns.etcd_keyfile,
                       username=ns.etcd_username, password=ns.etcd_password,
                       timeout=ns.etcd_timeout)
    etcd.hosts()  # validates the endpoints
    iface = ns.iface if ns.iface is not None else [
        s for s in (_env(environ, "iface") or "").split(",") if s]
    public_ip = None
    if ns.public_ip:
        try:
            public_ip = ipaddress.IPv4Address(ns.public_ip)
        except ValueError:
            raise FlagError(f"--public-ip must be an IPv4 address, got {ns.public_ip!r}"
                            ) from None
    if not 0 <= ns.healthz_port <= 65535:
        raise FlagError(f"--healthz-port must be in 0..65535, got {ns.healthz_port}")
    margin = ns.subnet_lease_renew_margin * 60.0
    if ns.subnet_lease_ttl < 5:
        raise FlagError(f"--subnet-lease-ttl must be at least 5 s, got {ns.subnet_lease_ttl}")
    if not 0 < margin < ns.subnet_lease_ttl:
        raise FlagError(f"--subnet-lease-renew-margin must be above 0 and below the lease "
                        f"TTL ({ns.subnet_lease_ttl / 60:g} min), got "
                        f"{ns.subnet_lease_renew_margin:g} min")
    if not 1 <= ns.workers <= 64:
        raise FlagError(f"--workers must be in 1..64, got {ns.workers}")
    if not 0 <= ns.source_ports <= 64:
        raise FlagError(f"--source-ports must be in 0..64, got {ns.source_ports}")
    # argparse checks choices on the command line only, not FLANNELD_* defaults.
    for flag, value, allowed in (("etcd-api", ns.etcd_api, ("auto", "v2", "v3")),
                                 ("log-level", ns.log_level,
                                  ("debug", "info", "warning", "error")),
                                 ("log-format", ns.log_format, ("text", "json")),
                                 ("engine-offload", ns.engine_offload, ("on", "off")),
                                 ("tunnel-gso", ns.tunnel_gso, ("auto", "on", "off")),
                                 ("inner-source-check", ns.inner_source_check, ("on", "off"))):
        if value not in allowed:
            raise FlagError(f"--{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return AgentOptions(
        etcd=etcd, etcd_api=ns.etcd_api, iface=tuple(iface), public_ip=public_ip,
        subnet_file=ns.subnet_file, renew_margin=margin, lease_ttl=ns.subnet_lease_ttl,
        ip_masq=ns.ip_masq, healthz_ip=ns.healthz_ip, healthz_port=ns.healthz_port,
        log_level="debug" if ns.verbose else ns.log_level, log_format=ns.log_format,
        watch_timeout=ns.watch_timeout, engine_offload=ns.engine_offload == "on",
        tunnel_gso=ns.tunnel_gso, inner_source_check=ns.inner_source_check == "on",
        workers=ns.workers, source_ports=ns.source_ports)
