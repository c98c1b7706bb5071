"""--ip-masq rule set: flannel's semantics per traffic class, and both renderings."""

from __future__ import annotations

from ipaddress import IPv4Address as A
from ipaddress import IPv4Network as N

import pytest

from control import masq

NET, OWN = N("10.244.0.0/16"), N("10.244.1.0/24")
RULES = masq.masq_rules(NET, OWN) + masq.forward_rules(NET)

# (what, src, dst, mark) -> what the nat postrouting chain does
CASES = [
    ("own container to the outside", "10.244.1.2", "10.99.0.1", 0, "masquerade"),
    ("forwarded overlay traffic leaving the Network", "10.244.2.2", "10.99.0.1", 0,
     "masquerade"),
    ("own container to another node's container", "10.244.1.2", "10.244.2.2", 0, "return"),
    ("another node's container to ours", "10.244.2.2", "10.244.1.2", 0, "return"),
    ("the outside to our container", "10.99.0.1", "10.244.1.2", 0, "return"),
    ("the host to another node's container", "10.10.1.1", "10.244.2.2", 0, "masquerade"),
    ("overlay to multicast", "10.244.1.2", "224.0.0.251", 0, "none"),
    ("overlay to the top of the multicast range", "10.244.1.2", "239.255.255.250", 0, "none"),
    ("kube-proxy marked", "10.244.1.2", "10.99.0.1", 0x4000, "return"),
    ("kube-proxy mark among other bits", "10.244.1.2", "10.99.0.1", 0xC001, "return"),
    ("other mark bits only", "10.244.1.2", "10.99.0.1", 0x8000, "masquerade"),
    ("host traffic to the outside", "10.10.1.1", "10.99.0.1", 0, "none"),
]


@pytest.mark.parametrize(("what", "src", "dst", "mark", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_flannel_masquerade_semantics(what, src, dst, mark, expected):
    assert masq.verdict(RULES, A(src), A(dst), mark) == expected


def test_forward_accepts_only_overlay_traffic():
    assert masq.verdict(RULES, A("10.244.1.2"), A("10.99.0.1"), chain="forward") == "accept"
    assert masq.verdict(RULES, A("10.99.0.1"), A("10.244.7.2"), chain="forward") == "accept"
    assert masq.verdict(RULES, A("10.99.0.1"), A("10.10.1.1"), chain="forward") == "none"


def test_rule_order_is_flannels():
    kinds = [(r.action, r.src and (str(r.src.net), r.src.negate),
              r.dst and (str(r.dst.net), r.dst.negate)) for r in masq.masq_rules(NET, OWN)]
    assert kinds == [
        ("return", None, None),
        ("return", ("10.244.1.0/24", False), ("10.244.0.0/16", False)),
        ("return", ("10.244.0.0/16", False), ("10.244.1.0/24", False)),
        ("return", ("10.244.0.0/16", True), ("10.244.1.0/24", False)),
        ("masquerade", ("10.244.0.0/16", False), ("224.0.0.0/4", True)),
        ("masquerade", ("10.244.0.0/16", True), ("10.244.0.0/16", False)),
    ]


def test_nft_script_replaces_our_table_atomically():
    text = masq.nft_script(RULES)
    lines = text.splitlines()
    # Create-if-missing, delete, recreate: one transaction, idempotent.
    assert lines[:3] == ["table ip flannelette {}", "delete table ip flannelette",
                         "table ip flannelette {"]
    assert "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random" in text
    assert "meta mark & 0x4000 == 0x4000 return" in text
    assert "type nat hook postrouting priority 100" in text
    assert "ip daddr 10.244.0.0/16 accept" in text
    plain = masq.nft_script(RULES, random_fully=False)
    assert "fully-random" not in plain and plain.count("masquerade") == 2


def test_iptables_script_declares_our_chains_then_fills_them():
    text = masq.iptables_restore_script(RULES)
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[1] == ":FLANNELETTE-POSTRTG - [0:0]"
    assert ('-A FLANNELETTE-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment '
            '"flannelette masq" -j MASQUERADE --random-fully') in lines
    assert ('-A FLANNELETTE-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment '
            '"flannelette masq" -j RETURN') in lines
    assert lines.count("COMMIT") == 2 and "*filter" in lines
    jumps = masq.iptables_jumps(RULES)
    assert [(t, c) for t, c, _ in jumps] == [("nat", "POSTROUTING"), ("filter", "FORWARD")]
    only_masq = masq.iptables_restore_script(masq.masq_rules(NET, OWN))
    assert "*filter" not in only_masq
