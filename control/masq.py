"""``--ip-masq``: the masquerade (and forward-accept) rules flannel installs, ours to remove.

The rule set is pure data (:func:`masq_rules`, :func:`forward_rules`), rendered
for nftables (one table of ours, replaced atomically) or iptables (chains of
ours, filled with ``iptables-restore --noflush`` and one jump each); a small
applier runs ``nft`` or ``iptables``, whichever the host has (nft first). Both
are idempotent: installing twice leaves one copy; removing what is not there is
fine. Flannel's rules (``pkg/trafficmngr``), in order, for Network N and our
subnet S:

1. kube-proxy-marked packets (mark 0x4000/0x4000): leave alone (no double NAT);
2. S -> N: return (overlay to overlay keeps its source);
3. N -> S: return;
4. !N -> S: return (outside traffic arriving for our containers keeps its source);
5. N -> !224.0.0.0/4: masquerade (overlay leaving the Network; not multicast);
6. !N -> N: masquerade (the host itself talking to the overlay).
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from control.errors import ControlError

NFT_TABLE = "flannelette"
IPT_MASQ_CHAIN = "FLANNELETTE-POSTRTG"
IPT_FWD_CHAIN = "FLANNELETTE-FWD"
IPT_MASQ_COMMENT = "flannelette masq"
IPT_FWD_COMMENT = "flannelette forward"
KUBE_PROXY_MARK = 0x4000
MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
TOOLS = ("nft", "iptables")


class MasqError(ControlError):
    """The firewall tool refused our rules; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class Match:
    """An address match, possibly negated (``!= net``)."""

    net: ipaddress.IPv4Network
    negate: bool = False

    def hits(self, addr: ipaddress.IPv4Address) -> bool:
        return (addr in self.net) != self.negate


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of ours: in chain ``postrouting`` (nat) or ``forward`` (filter)."""

    chain: str  # "postrouting" | "forward"
    action: str  # "return" | "masquerade" | "accept"
    src: Match | None = None
    dst: Match | None = None
    mark: int | None = None  # match (mark & m) == m


def masq_rules(network: ipaddress.IPv4Network, own_subnet: ipaddress.IPv4Network
               ) -> tuple[Rule, ...]:
    """Flannel's masquerade rules for ``network`` and our lease ``own_subnet``, in order."""
    n, s = network, own_subnet
    return (
        Rule("postrouting", "return", mark=KUBE_PROXY_MARK),
        Rule("postrouting", "return", Match(s), Match(n)),
        Rule("postrouting", "return", Match(n), Match(s)),
        Rule("postrouting", "return", Match(n, True), Match(s)),
        Rule("postrouting", "masquerade", Match(n), Match(MULTICAST, True)),
        Rule("postrouting", "masquerade", Match(n, True), Match(n)),
    )


def forward_rules(network: ipaddress.IPv4Network) -> tuple[Rule, ...]:
    """Flannel's forward rules: accept traffic from or to the Network."""
    return (Rule("forward", "accept", src=Match(network)),
            Rule("forward", "accept", dst=Match(network)))


def verdict(rules: Sequence[Rule], src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address,
            mark: int = 0, chain: str = "postrouting") -> str:
    """What ``rules`` do to one packet: the first matching rule's action, else "none"."""
    for r in rules:
        if r.chain != chain:
            continue
        if r.mark is not None and (mark & r.mark) != r.mark:
            continue
        if r.src is not None and not r.src.hits(src):
            continue
        if r.dst is not None and not r.dst.hits(dst):
            continue
        return r.action
    return "none"


# ---- nftables --------------------------------------------------------------------------------
def _nft_match(field: str, m: Match | None) -> list[str]:
    if m is None:
        return []
    return [f"ip {field}", "!=" if m.negate else "", str(m.net)]


def _nft_rule(r: Rule, random_fully: bool) -> str:
    words: list[str] = []
    if r.mark is not None:
        words += [f"meta mark & {r.mark:#x} == {r.mark:#x}"]
    words += _nft_match("saddr", r.src) + _nft_match("daddr", r.dst)
    words.append("masquerade fully-random" if r.action == "masquerade" and random_fully
                 else r.action)
    return " ".join(w for w in words if w)


def nft_script(rules: Sequence[Rule], *, table: str = NFT_TABLE, random_fully: bool = True
               ) -> str:
    """An ``nft -f`` script that replaces our whole table atomically (create, delete, fill)."""
    chains = {"postrouting": "type nat hook postrouting priority 100; policy accept;",
              "forward": "type filter hook forward priority 0; policy accept;"}
    lines = [f"table ip {table} {{}}", f"delete table ip {table}", f"table ip {table} {{"]
    for chain, header in chains.items():
        body = [r for r in rules if r.chain == chain]
        if not body:
            continue
        lines.append(f"\tchain {chain} {{")
        lines.append(f"\t\t{header}")
        lines += [f"\t\t{_nft_rule(r, random_fully)}" for r in body]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- iptables ----------------------------------------------------------------------------------
def _ipt_match(flag: str, m: Match | None) -> list[str]:
    if m is None:
        return []
    return (["!"] if m.negate else []) + [flag, str(m.net)]


def _ipt_rule(r: Rule, random_fully: bool) -> list[str]:
    words: list[str] = []
    if r.mark is not None:
        words += ["-m", "mark", "--mark", f"{r.mark:#x}/{r.mark:#x}"]
    words += _ipt_match("-s", r.src) + _ipt_match("-d", r.dst)
    comment = IPT_MASQ_COMMENT if r.chain == "postrouting" else IPT_FWD_COMMENT
    words += ["-m", "comment", "--comment", f'"{comment}"']
    target = {"return": "RETURN", "accept": "ACCEPT", "masquerade": "MASQUERADE"}[r.action]
    words += ["-j", target]
    if r.action == "masquerade" and random_fully:
        words.append("--random-fully")
    return words


def iptables_restore_script(rules: Sequence[Rule], *, random_fully: bool = True) -> str:
    """An ``iptables-restore --noflush`` script: declaring our chains empties them, then fills."""
    out: list[str] = []
    for table, chain, ours in (("nat", "postrouting", IPT_MASQ_CHAIN),
                               ("filter", "forward", IPT_FWD_CHAIN)):
        body = [r for r in rules if r.chain == chain]
        if not body:
            continue
        out += [f"*{table}", f":{ours} - [0:0]"]
        out += [" ".join(["-A", ours, *_ipt_rule(r, random_fully)]) for r in body]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def iptables_jumps(rules: Sequence[Rule]) -> list[tuple[str, str, list[str]]]:
    """(table, builtin chain, rulespec) of the jumps into our chains that ``rules`` need."""
    jumps = []
    if any(r.chain == "postrouting" for r in rules):
        jumps.append(("nat", "POSTROUTING",
                      ["-m", "comment", "--comment", IPT_MASQ_COMMENT, "-j", IPT_MASQ_CHAIN]))
    if any(r.chain == "forward" for r in rules):
        jumps.append(("filter", "FORWARD",
                      ["-m", "comment", "--comment", IPT_FWD_COMMENT, "-j", IPT_FWD_CHAIN]))
    return jumps


# ---- the applier (thin) ------------------------------------------------------------------------
def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)


def detect_tool() -> str | None:
    """``nft`` if it works here, else ``iptables`` if present, else None."""
    if shutil.which("nft") and _run(["nft", "list", "tables"]).returncode == 0:
        return "nft"
    if shutil.which("iptables") and shutil.which("iptables-restore"):
        return "iptables"
    return None


def install(rules: Sequence[Rule], tool: str | None = None) -> str:
    """Install ``rules`` (replacing any earlier copy of ours); returns the tool used.

    ``masquerade fully-random`` is tried first and dropped if the kernel refuses it,
    as flannel does.
    """
    tool = tool or detect_tool()
    if tool not in TOOLS:
        raise MasqError("--ip-masq needs nftables (nft) or iptables; neither works here")
    errors = []
    for random_fully in (True, False):
        if tool == "nft":
            p = _run(["nft", "-f", "-"], nft_script(rules, random_fully=random_fully))
        else:
            p = _run(["iptables-restore", "-w", "--noflush"],
                     iptables_restore_script(rules, random_fully=random_fully))
        if p.returncode == 0:
            break
        errors.append(p.stderr.strip())
    else:
        raise MasqError(f"{tool} refused the masquerade rules: {' / '.join(errors)}")
    if tool == "iptables":
        for table, chain, spec in iptables_jumps(rules):
            if _run(["iptables", "-w", "-t", table, "-C", chain, *spec]).returncode != 0:
                p = _run(["iptables", "-w", "-t", table, "-A", chain, *spec])
                if p.returncode != 0:
                    raise MasqError(f"iptables -t {table} -A {chain}: {p.stderr.strip()}")
    return tool


def remove() -> list[str]:
    """Remove our nft table and our iptables chains, whichever exist; returns what went."""
    removed = []
    if shutil.which("nft") and _run(["nft", "list", "table", "ip", NFT_TABLE]).returncode == 0:
        p = _run(["nft", "delete", "table", "ip", NFT_TABLE])
        if p.returncode != 0:
            raise MasqError(f"nft delete table ip {NFT_TABLE}: {p.stderr.strip()}")
        removed.append(f"nft table ip {NFT_TABLE}")
    if shutil.which("iptables"):
        for table, chain, ours, comment in (
                ("nat", "POSTROUTING", IPT_MASQ_CHAIN, IPT_MASQ_COMMENT),
                ("filter", "FORWARD", IPT_FWD_CHAIN, IPT_FWD_COMMENT)):
            if _run(["iptables", "-w", "-t", table, "-S", ours]).returncode != 0:
                continue
            spec = ["-m", "comment", "--comment", comment, "-j", ours]
            for _ in range(100):  # every copy of the jump, bounded
                if _run(["iptables", "-w", "-t", table, "-D", chain, *spec]).returncode != 0:
                    break
            _run(["iptables", "-w", "-t", table, "-F", ours])
            p = _run(["iptables", "-w", "-t", table, "-X", ours])
            if p.returncode != 0:
                raise MasqError(f"iptables -t {table} -X {ours}: {p.stderr.strip()}")
            removed.append(f"iptables {table} {ours}")
    return removed


async def ainstall(network: ipaddress.IPv4Network, own_subnet: ipaddress.IPv4Network, *,
                   forward: bool = True, tool: str | None = None) -> str:
    """For the agent: flannel's masquerade rules (plus forward accepts) off the event loop."""
    rules = masq_rules(network, own_subnet) + (forward_rules(network) if forward else ())
    return await asyncio.to_thread(install, rules, tool)


async def aremove() -> list[str]:
    return await asyncio.to_thread(remove)
