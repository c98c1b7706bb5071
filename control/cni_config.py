"""The pure half of the CNI plugin: flannel's netconf + subnet.env -> the delegate's config.

Everything here takes text, bytes or mappings and returns documents or raises
:class:`CniError`; nothing touches files, processes or the environment, so the
rules can be tested without root. ``control/cni.py`` is the thin I/O around it.

The rules are flannel's CNI plugin (flannel-io/cni-plugin, ``flannel.go`` and
``flannel_linux.go``) and the CNI library's ``skel`` dispatcher it is built on:
the same defaults, the same subnet.env parsing, the same delegate config byte
for byte (keys sorted, as Go marshals maps), the same version checks. Where
flannel answers every failure with code 999, we use the spec's codes (see
``docs/cni.md``).
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLUGIN_VERSION = "0.1.0"
CURRENT_VERSION = "1.1.0"  # what VERSION reports as its own cniVersion, as CNI 1.3's skel
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Json = dict[str, Any]


class Code(enum.IntEnum):
    """The CNI spec's well-known error codes."""

    UNKNOWN = 0
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    INVALID_NETNS = 8
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    LIMITED_CONNECTIVITY = 51
    INTERNAL = 999


class CniError(Exception):
    """A failure the plugin reports to the runtime as a CNI error document."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def document(self, cni_version: str = CURRENT_VERSION) -> Json:
        """The spec's error object; ``details`` omitted when empty, as Go's omitempty."""
        doc: Json = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc

    def to_json(self, cni_version: str = CURRENT_VERSION) -> str:
        return json.dumps(self.document(cni_version), indent=4) + "\n"


def version_json() -> str:
    """VERSION's answer, as Go's json.Encoder writes it (compact, one newline)."""
    return dumps({"cniVersion": CURRENT_VERSION,
                  "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n"


def about() -> str:
    """What the plugin prints to stderr when run with no CNI_COMMAND (as skel does)."""
    return (f"CNI Plugin flannel (flannelette-cni) version {PLUGIN_VERSION}\n"
            f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")


def dumps(doc: Any) -> str:
    """Compact JSON with sorted keys: what Go's json.Marshal makes of flannel's maps."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


# ---- versions --------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int, int]:
    """Go's version.ParseVersion: "" is 0.1.0, missing parts are 0, four parts are an error."""
    if text == "":
        return (0, 1, 0)
    parts = text.split(".")
    if len(parts) >= 4:
        raise CniError(Code.DECODING_FAILURE, f'invalid version "{text}": too many parts')
    nums = [0, 0, 0]
    for i, part in enumerate(parts):
        if not re.fullmatch(r"[+-]?\d+", part):
            raise CniError(Code.DECODING_FAILURE,
                           f'failed to convert version part "{part}" of "{text}"')
        nums[i] = int(part)
    return (nums[0], nums[1], nums[2])


def version_at_least(version: str, other: str) -> bool:
    return parse_version(version) >= parse_version(other)


def _go_quote_list(items: Sequence[str]) -> str:
    return "[" + " ".join(json.dumps(i) for i in items) + "]"


def check_version(command: str, cni_version: str) -> None:
    """skel's checks: CHECK needs >= 0.4.0, GC and STATUS >= 1.1.0, then an exact match."""
    need = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
    if need is not None and not version_at_least(cni_version, need):
        raise CniError(Code.INCOMPATIBLE_VERSION,
                       f"config version does not allow {command}")
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(Code.INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'config is "{cni_version}", plugin supports '
                       f"{_go_quote_list(SUPPORTED_VERSIONS)}")


# ---- the runtime's environment ----------------------------------------------------------------
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# variable -> commands that require it (skel's table)
_REQUIRED: tuple[tuple[str, frozenset[str]], ...] = (
    ("CNI_COMMAND", frozenset(COMMANDS)),
    ("CNI_CONTAINERID", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_NETNS", frozenset({"ADD", "CHECK"})),
    ("CNI_IFNAME", frozenset({"ADD", "CHECK", "DEL"})),
    ("CNI_ARGS", frozenset()),
    ("CNI_PATH", frozenset({"ADD", "CHECK", "DEL", "GC", "STATUS"})),
)


@dataclass(frozen=True, slots=True)
class CmdArgs:
    """What the runtime passed in CNI_* variables."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    path: tuple[str, ...]


def validate_container_id(cid: str) -> None:
    """The ID becomes a file name under dataDir, so the spec's character set is enforced."""
    if not _NAME_RE.fullmatch(cid):
        raise CniError(Code.INVALID_ENV, "invalid characters in containerID", cid)


def validate_ifname(name: str) -> None:
    """The kernel's rules for interface names, as CNI's utils.ValidateInterfaceName."""
    if len(name) > 15:
        raise CniError(Code.INVALID_ENV, "interface name is too long",
                       "interface name should be less than 16 characters")
    if name in (".", ".."):
        raise CniError(Code.INVALID_ENV, "interface name is . or ..")
    if any(c in "/:" or c.isspace() for c in name):
        raise CniError(Code.INVALID_ENV,
                       "interface name contains / or : or whitespace characters")


def cmd_args(environ: Mapping[str, str]) -> CmdArgs:
    """CNI_* variables checked in skel's order: first a bad value, then all missing ones."""
    command = environ.get("CNI_COMMAND", "")
    missing: list[str] = []
    for var, required_by in _REQUIRED:
        value = environ.get(var, "")
        if value == "":
            if command in required_by or var == "CNI_COMMAND":
                missing.append(var)
        elif command in required_by and var == "CNI_CONTAINERID":
            validate_container_id(value)
        elif command in required_by and var == "CNI_IFNAME":
            validate_ifname(value)
    if missing:
        raise CniError(Code.INVALID_ENV,
                       f"required env variables [{','.join(missing)}] missing")
    if command not in COMMANDS:
        raise CniError(Code.INVALID_ENV, f"unknown CNI_COMMAND: {command}")
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    return CmdArgs(command, environ.get("CNI_CONTAINERID", ""), environ.get("CNI_NETNS", ""),
                   environ.get("CNI_IFNAME", ""), environ.get("CNI_ARGS", ""), path)


# ---- flannel's network config -----------------------------------------------------------------
def go_field(obj: Mapping[str, Any], name: str) -> Any:
    """A struct field as Go's decoder fills it: names match case-insensitively, last wins."""
    found: Any = None
    want = name.lower()
    for key, value in obj.items():
        if key.lower() == want:
            found = value
    return found


@dataclass(frozen=True, slots=True)
class FlannelConf:
    """flannel's NetConf: the fields the plugin reads (the rest is ignored, as in Go)."""

    cni_version: str  # as written ("" when absent)
    name: str
    subnet_file: str
    data_dir: str
    delegate: Json | None
    ipam: Json | None
    runtime_config: Json | None
    prev_result: Json | None

    @property
    def version(self) -> str:
        """The effective version: an absent cniVersion means 0.1.0."""
        return self.cni_version or "0.1.0"


def decode_netconf(data: bytes) -> Json:
    """stdin as skel checks it: JSON (code 6), an object with a valid name (code 7)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CniError(Code.DECODING_FAILURE, f"error unmarshall network config: {e}") from None
    if not isinstance(doc, dict):
        raise CniError(Code.DECODING_FAILURE, "error unmarshall network config: "
                       f"expected a JSON object, got {type(doc).__name__}")
    name = go_field(doc, "name")
    if name is not None and not isinstance(name, str):
        raise CniError(Code.DECODING_FAILURE,
                       "error unmarshall network config: name must be a string")
    if not name:
        raise CniError(Code.INVALID_NETWORK_CONFIG, "missing network name")
    if not _NAME_RE.fullmatch(name):
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "invalid characters found in network name", name)
    version = go_field(doc, "cniVersion")
    if version is not None and not isinstance(version, str):
        raise CniError(Code.DECODING_FAILURE,
                       "decoding version from network config: cniVersion must be a string")
    return doc


def _optional(doc: Mapping[str, Any], name: str, kind: type, kind_name: str) -> Any:
    value = go_field(doc, name)
    if value is not None and not isinstance(value, kind):
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       f"failed to load netconf: {name} must be {kind_name}")
    return value


def flannel_conf(doc: Mapping[str, Any]) -> FlannelConf:
    """The decoded netconf's fields with flannel's defaults for subnetFile and dataDir."""
    subnet_file = _optional(doc, "subnetFile", str, "a string")
    data_dir = _optional(doc, "dataDir", str, "a string")
    return FlannelConf(
        cni_version=go_field(doc, "cniVersion") or "",
        name=go_field(doc, "name"),
        subnet_file=DEFAULT_SUBNET_FILE if subnet_file is None else subnet_file,
        data_dir=DEFAULT_DATA_DIR if data_dir is None else data_dir,
        delegate=_optional(doc, "delegate", dict, "an object"),
        ipam=_optional(doc, "ipam", dict, "an object"),
        runtime_config=_optional(doc, "runtimeConfig", dict, "an object"),
        prev_result=_optional(doc, "prevResult", dict, "an object"),
    )


# ---- subnet.env --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlannelEnv:
    """subnet.env as flannel's plugin reads it (networks and subnets masked, as ParseCIDR)."""

    networks: tuple[Network, ...]
    subnet: Network | None
    ipv6_networks: tuple[Network, ...]
    ipv6_subnet: Network | None
    mtu: int
    ipmasq: bool


def parse_cidr(text: str) -> Network:
    """Go's net.ParseCIDR, returning the masked network: "addr/len" only, no netmask form."""
    addr, sep, plen = text.partition("/")
    if not sep or not plen.isdigit() or not plen.isascii():
        raise ValueError(f"invalid CIDR address: {text}")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"invalid CIDR address: {text}") from None
    if int(plen) > ip.max_prefixlen:
        raise ValueError(f"invalid CIDR address: {text}")
    return ipaddress.ip_network(f"{ip}/{int(plen)}", strict=False)


def _cidr_list(text: str) -> tuple[Network, ...]:
    out: list[Network] = []
    for item in text.split(","):
        net = parse_cidr(item)
        if net not in out:
            out.append(net)
    return tuple(out)


def _parse_mtu(text: str) -> int:
    """strconv.ParseUint(s, 10, 32): ASCII digits only, at most 2^32-1."""
    if not text.isascii() or not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise ValueError(f'strconv.ParseUint: parsing "{text}": invalid syntax')
    return int(text)


def parse_subnet_env(text: str, path: str) -> FlannelEnv:
    """Lines ``KEY=VALUE``; unknown keys ignored, a later line wins, a bad value or a
    missing variable is an error naming ``path`` (flannel's rules, its message)."""
    networks: tuple[Network, ...] = ()
    ipv6_networks: tuple[Network, ...] = ()
    subnet: Network | None = None
    ipv6_subnet: Network | None = None
    mtu: int | None = None
    ipmasq: bool | None = None
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        key, sep, value = line.partition("=")
        if key not in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK",
                       "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"):
            continue
        try:
            if not sep:
                raise ValueError(f"{key} has no value")
            if key == "FLANNEL_NETWORK":
                networks = _cidr_list(value)
            elif key == "FLANNEL_IPV6_NETWORK":
                ipv6_networks = _cidr_list(value)
            elif key == "FLANNEL_SUBNET":
                subnet = parse_cidr(value)
            elif key == "FLANNEL_IPV6_SUBNET":
                ipv6_subnet = parse_cidr(value)
            elif key == "FLANNEL_MTU":
                mtu = _parse_mtu(value)
            else:
                ipmasq = value == "true"
        except ValueError as e:
            raise CniError(Code.DECODING_FAILURE,
                           f"failed to load flannel 'subnet.env' file {path}: line {lineno}: "
                           f"{e}. Check the flannelette log for this node.") from None
    missing: list[str] = []
    if not networks and not ipv6_networks:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if subnet is None and ipv6_subnet is None:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    if mtu is None:
        missing.append("FLANNEL_MTU")
    if ipmasq is None:
        missing.append("FLANNEL_IPMASQ")
    if mtu is None or ipmasq is None or missing:
        raise CniError(Code.DECODING_FAILURE,
                       f"failed to load flannel 'subnet.env' file: {path} is missing "
                       f"{', '.join(missing)}. Check the flannelette log for this node.")
    return FlannelEnv(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq)


# ---- the delegate's config ---------------------------------------------------------------------
_ROUTE_FIELDS = ("dst", "gw", "mtu", "advmss", "priority", "table", "scope")


def _ipam_routes(ipam: Mapping[str, Any]) -> list[Json]:
    """ipam.routes as Go's []types.Route decodes them: objects with a CIDR dst."""
    routes = ipam.get("routes")
    if routes is None:
        return []
    bad = "failed to assemble Delegate IPAM: failed to read IPAM routes: " \
          "failed to parse ipam.routes: "
    if not isinstance(routes, list):
        raise CniError(Code.INVALID_NETWORK_CONFIG, bad + "routes must be a list")
    out: list[Json] = []
    for route in routes:
        if not isinstance(route, dict):
            raise CniError(Code.INVALID_NETWORK_CONFIG, bad + f"not an object: {route!r}")
        dst = route.get("dst")
        try:
            if not isinstance(dst, str):
                raise ValueError(f"invalid CIDR address: {dst!r}")
            parse_cidr(dst)
        except ValueError as e:
            raise CniError(Code.INVALID_NETWORK_CONFIG, bad + str(e)) from None
        out.append({k: route[k] for k in _ROUTE_FIELDS if route.get(k) not in (None, "", 0)})
    return out


def delegate_ipam(conf: FlannelConf, env: FlannelEnv) -> Json:
    """The netconf's own ``ipam`` completed: host-local unless typed, ranges = our subnet(s),
    routes = its routes then every flannel network (getDelegateIPAM)."""
    ipam: Json = dict(conf.ipam or {})
    ipam.setdefault("type", "host-local")
    ranges: list[list[Json]] = []
    if env.subnet is not None:
        ranges.append([{"subnet": str(env.subnet)}])
    if env.ipv6_subnet is not None:
        ranges.append([{"subnet": str(env.ipv6_subnet)}])
    ipam["ranges"] = ranges
    routes = _ipam_routes(ipam)
    routes += [{"dst": str(net)} for net in (*env.networks, *env.ipv6_networks)]
    ipam["routes"] = routes
    return ipam


def delegate_conf(conf: FlannelConf, env: FlannelEnv) -> Json:
    """flannel's cmdAdd + doCmdAdd: the config the delegate plugin (bridge) gets on stdin."""
    delegate: Json = dict(conf.delegate or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "'delegate' dictionary, if present, must have (string) 'type' field")
    if "name" in delegate:
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "'delegate' dictionary must not have 'name' field, "
                       "it'll be set by flannel")
    if "ipam" in delegate:
        raise CniError(Code.INVALID_NETWORK_CONFIG,
                       "'delegate' dictionary must not have 'ipam' field, "
                       "it'll be set by flannel")
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    delegate["name"] = conf.name
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)  # if flannel is not masquerading, we should
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.cni_version:
        delegate["cniVersion"] = conf.cni_version
    delegate["ipam"] = delegate_ipam(conf, env)
    return delegate


def render_delegate(delegate: Mapping[str, Any]) -> bytes:
    """The bytes sent to the delegate and stored for DEL (Go's json.Marshal of the map)."""
    return dumps(delegate).encode()


def stored_delegate(data: bytes) -> Json | None:
    """A stored delegate config, or None when it is not a JSON object with a string type
    (flannel then gives up on the delegate's DEL and succeeds)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        return None
    return doc


def route_gateways_filled(result: Mapping[str, Any]) -> Json:
    """A result whose gateway-less routes carry the gateway they were installed with.

    The delegate installs a route without ``gw`` via its interface's gateway
    (ipam.ConfigureIface), but the reference plugins before v1.3.0 (Debian 12 ships
    1.1.1) then look for a route *without* a gateway on CHECK and fail every flannel
    config (containernetworking/plugins#886). Naming the gateway is what the kernel
    holds, so the comparison is the same for fixed plugins and passes for old ones."""
    doc: Json = dict(result)
    ips, routes = doc.get("ips"), doc.get("routes")
    if not isinstance(ips, list) or not isinstance(routes, list):
        return doc
    gateways: dict[int, str] = {}
    for ip in ips:
        if isinstance(ip, dict) and isinstance(ip.get("gateway"), str):
            with contextlib.suppress(ValueError):
                gateways.setdefault(ipaddress.ip_address(ip["gateway"]).version, ip["gateway"])
    filled: list[Any] = []
    for route in routes:
        if isinstance(route, dict) and not route.get("gw") and isinstance(route.get("dst"), str):
            family: int = 0
            with contextlib.suppress(ValueError):
                family = parse_cidr(route["dst"]).version
            if family in gateways:
                route = {**route, "gw": gateways[family]}
        filled.append(route)
    doc["routes"] = filled
    return doc


def check_conf(stored: Mapping[str, Any], prev_result: Json | None) -> bytes:
    """CHECK's delegate config: the stored ADD config plus the runtime's prevResult, which
    the delegate (bridge, host-local) compares with the container's real state."""
    doc: Json = dict(stored)
    if prev_result is not None:
        doc["prevResult"] = route_gateways_filled(prev_result)
    else:
        doc.pop("prevResult", None)
    return dumps(doc).encode()


def plugin_name_error(plugin: str) -> CniError | None:
    """invoke.FindInPath's refusals of a type that cannot be a file name."""
    if plugin == "":
        return CniError(Code.INVALID_NETWORK_CONFIG, "no plugin name provided")
    if "/" in plugin:
        return CniError(Code.INVALID_NETWORK_CONFIG, f"invalid plugin name: {plugin}")
    return None


def not_found_error(plugin: str, paths: Sequence[str]) -> CniError:
    return CniError(Code.INTERNAL, f'failed to find plugin "{plugin}" in path '
                                   f"[{' '.join(paths)}]")


# ---- what the delegate answered ---------------------------------------------------------------
def add_result(stdout: bytes, cni_version: str) -> bytes:
    """ADD's result as relayed: verbatim, with the config's cniVersion added when the delegate
    left it out (invoke's fixupResultVersion); not a JSON object -> code 999."""
    try:
        doc = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CniError(Code.INTERNAL, f"failed to delegate add: failed to unmarshal raw "
                                      f"result: {e}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise CniError(Code.INTERNAL, "failed to delegate add: result is not a JSON object")
    version = doc.get("cniVersion")
    if isinstance(version, str) and version:
        return stdout if stdout.endswith(b"\n") else stdout + b"\n"
    doc["cniVersion"] = cni_version
    return (json.dumps(doc, indent=4) + "\n").encode()


def delegate_failure(stdout: bytes, stderr: bytes, returncode: int, cni_version: str
                     ) -> bytes:
    """The error document for a delegate that exited non-zero: its own when it wrote one
    (relayed verbatim), else one made from its stderr, as invoke's pluginErr."""
    try:
        doc = json.loads(stdout.decode("utf-8")) if stdout.strip() else None
    except (UnicodeDecodeError, ValueError):
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        return stdout if stdout.endswith(b"\n") else stdout + b"\n"
    if stdout.strip():
        msg = (f"netplugin failed but error parsing its diagnostic message "
               f"{json.dumps(stdout.decode('utf-8', 'replace'))}: exit status {returncode}")
    elif stderr.strip():
        msg = (f"netplugin failed: {json.dumps(stderr.decode('utf-8', 'replace'))}: "
               f"exit status {returncode}")
    else:
        msg = f"netplugin failed with no error message: exit status {returncode}"
    return CniError(Code.INTERNAL, msg).to_json(cni_version).encode()
