"""Engine configuration, peer swapping and stats records, and the runner's flag errors.

No root: nothing here opens a device (the packet paths run in tests/netns/).
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from dataplane import standalone
from dataplane.engine import Engine, EngineConfig
from dataplane.errors import ConfigError
from dataplane.fib import FibError, Path, Peer
from dataplane.stats import EngineStats, PeerCounters

NET = ipaddress.IPv4Network
IP = ipaddress.IPv4Address
MAC = bytes.fromhex("0a0000000001")


def config(**kw: object) -> EngineConfig:
    args: dict[str, object] = {"subnet": NET("10.244.1.0/24"), "public_ip": IP("10.10.1.1"),
                               "vtep_mac": MAC}
    args.update(kw)
    return EngineConfig(**args)  # type: ignore[arg-type]


def test_defaults_follow_flannel() -> None:
    c = config()
    assert (c.vni, c.mtu, c.port, c.device_name) == (1, 1450, 8472, "flannel.1")
    assert config(vni=7).device_name == "flannel.7"
    assert Engine(config(tun_name="fx0")).tun_name == "fx0"


@pytest.mark.parametrize(("kw", "word"), [
    ({"vtep_mac": b"\x01" + bytes(5)}, "VtepMAC"),
    ({"vtep_mac": b"\x0a"}, "VtepMAC"),
    ({"vni": 1 << 24}, "VNI"),
    ({"mtu": 20}, "MTU"),
    ({"port": 0}, "port"),
    ({"batch": 0}, "batch"),
    ({"tun_name": "x" * 16}, "TUN name"),
])
def test_bad_config_names_the_field(kw: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        config(**kw)


def test_set_peers_swaps_and_keeps_counters_of_surviving_peers() -> None:
    engine = Engine(config())
    a = Peer(NET("10.244.2.0/24"), IP("10.10.1.2"), bytes.fromhex("0a0000000002"))
    b = Peer(NET("10.244.3.0/24"), IP("10.10.1.3"), bytes.fromhex("0a0000000003"))
    d = Peer(NET("10.244.4.0/24"), IP("10.10.1.4"), None, Path.DIRECT)
    engine.set_peers([a, b, d])
    assert set(engine.snapshot().peers) == {"10.244.2.0/24", "10.244.3.0/24"}
    assert engine.fib.lookup(int(IP("10.244.3.9"))) is not None
    engine.set_peers([b])
    snap = engine.snapshot()
    assert set(snap.peers) == {"10.244.3.0/24"}
    assert snap.peers["10.244.3.0/24"] == PeerCounters()
    assert engine.fib.lookup(int(IP("10.244.2.9"))) is None
    with pytest.raises(FibError):
        engine.set_peers([a, a])
    assert engine.fib.lookup(int(IP("10.244.3.9"))) is not None  # a failed swap changes nothing


def test_snapshot_lists_every_drop_reason_and_round_trips_json() -> None:
    snap = Engine(config()).snapshot()
    assert snap.drops["unknown_peer"] == 0 and snap.total_drops == 0
    stats = EngineStats(peers={"10.244.2.0/24": PeerCounters(1, 2, 3, 4)},
                        drops={"truncated": 5}, tun_packets=9, udp_max_batch=3)
    again = EngineStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats


@pytest.mark.parametrize(("argv", "word"), [
    ([], "--subnet"),
    (["--subnet", "10.244.1.0/33", "--public-ip", "10.10.1.1"], "10.244.1.0/33"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.x"], "10.10.1.x"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1", "--vtep-mac", "zz"], "zz"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1", "--peer", "10.244.2.0/24"],
     "SUBNET,PUBLICIP,VTEPMAC"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1", "--mtu", "10"], "MTU"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1", "--loop", "trio"], "trio"),
    (["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1",
      "--peer", "10.244.2.0/24,10.10.1.2,0a:00:00:00:00:02",
      "--peer", "10.244.3.0/25,10.10.1.3,0a:00:00:00:00:03"], "prefix"),
])
def test_runner_flag_errors_are_one_line(argv: list[str], word: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert standalone.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


def test_runner_command_line() -> None:
    argv = standalone.command("10.244.1.0/24", "10.10.1.1", "0a:00:00:00:00:01",
                              [("10.244.2.0/24", "10.10.1.2", "0a:00:00:00:00:02")],
                              "--loop", "asyncio", python="python3")
    assert argv[:3] == ["python3", "-m", "dataplane.standalone"]
    assert "10.244.2.0/24,10.10.1.2,0a:00:00:00:00:02" in argv and argv[-1] == "asyncio"


def test_peer_is_a_kernel_peer_unless_marked_flannelette() -> None:
    plain = Peer(NET("10.244.2.0/24"), IP("10.10.1.2"), bytes.fromhex("0a0000000002"))
    assert plain.partial_csum is False
    p = standalone._parser().parse_args(
        ["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1",
         "--peer", "10.244.2.0/24,10.10.1.2,0a:00:00:00:00:02",
         "--peer", "10.244.3.0/24,10.10.1.3,0a:00:00:00:00:03,flannelette"])
    assert [x.partial_csum for x in p.peer] == [False, True]
    argv = standalone.command("10.244.1.0/24", "10.10.1.1", "0a:00:00:00:00:01",
                              [("10.244.3.0/24", "10.10.1.3", "0a:00:00:00:00:03",
                                standalone.FLANNELETTE)])
    assert "10.244.3.0/24,10.10.1.3,0a:00:00:00:00:03,flannelette" in argv


@pytest.mark.parametrize("spec", ["10.244.2.0/24,10.10.1.2,0a:00:00:00:00:02,kernel",
                                  "10.244.2.0/24,10.10.1.2,0a:00:00:00:00:02,flannelette,x"])
def test_peer_with_an_unknown_fourth_field_is_one_line_error(
        spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert standalone.main(["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1",
                            "--peer", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flannelette" in err and "Traceback" not in err


def test_stats_count_partial_checksum_segments_and_read_old_files() -> None:
    st = EngineStats(tx_csum_partial=7)
    assert EngineStats.from_dict(json.loads(json.dumps(st.to_dict()))).tx_csum_partial == 7
    old = st.to_dict()
    del old["tx_csum_partial"]  # a stats file written before the field existed
    assert EngineStats.from_dict(old).tx_csum_partial == 0


def test_udp_gso_and_gro_are_on_by_default_and_can_be_turned_off() -> None:
    c = config()
    assert (c.offload, c.rx_gro, c.tx_gso) == (False, True, True)
    p = standalone._parser().parse_args(["--subnet", "10.244.1.0/24", "--public-ip", "10.10.1.1",
                                         "--rx-gro", "off", "--tx-gso", "off"])
    assert (p.rx_gro, p.tx_gso) == ("off", "off")
