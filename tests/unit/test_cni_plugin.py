"""The plugin's I/O without root: a fake delegate in CNI_PATH records what it was given, so
storage under dataDir, DEL after a restart, relaying and exit codes are checked directly."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from control.cni import run

FAKE = """#!{python}
import json, os, sys
data = sys.stdin.read()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"command": os.environ["CNI_COMMAND"], "stdin": data,
                        "cid": os.environ.get("CNI_CONTAINERID"),
                        "netns": os.environ.get("CNI_NETNS"),
                        "ifname": os.environ.get("CNI_IFNAME"),
                        "extra": os.environ.get("RUNTIME_EXTRA")}}) + "\\n")
fail = os.environ.get("FAKE_FAIL", "")
if fail == "json":
    print(json.dumps({{"cniVersion": "1.0.0", "code": 7, "msg": "fake says no"}}))
    sys.exit(3)
if fail == "silent":
    sys.stderr.write("crashed")
    sys.exit(2)
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps({{"cniVersion": "1.0.0", "ips": [{{"address": "10.5.72.2/24"}}]}}))
"""
ENV_TEXT = ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
            "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")


class World:
    """A CNI bin dir with a fake ``bridge``, a subnet.env and a data dir, all under tmp."""

    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "bin"
        self.bin.mkdir()
        fake = self.bin / "bridge"
        fake.write_text(FAKE.format(python=sys.executable))
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        self.log = tmp / "calls.jsonl"
        self.subnet_file = tmp / "subnet.env"
        self.subnet_file.write_text(ENV_TEXT)
        self.data_dir = tmp / "flannel"

    def conf(self, **extra: Any) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
                "subnetFile": str(self.subnet_file), "dataDir": str(self.data_dir), **extra}

    def call(self, command: str, conf: dict[str, Any] | None = None, cid: str = "c1",
             **env: str) -> tuple[int, Any, str]:
        environ = {"PATH": os.environ.get("PATH", ""), "FAKE_LOG": str(self.log),
                   "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                   "CNI_NETNS": "/var/run/netns/does-not-exist", "CNI_IFNAME": "eth0",
                   "CNI_PATH": f"/nonexistent:{self.bin}", **env}
        stdout, stderr = io.BytesIO(), io.StringIO()
        stdin = io.BytesIO(json.dumps(conf if conf is not None else self.conf()).encode())
        code = run(environ, stdin, stdout, stderr)
        text = stdout.getvalue()
        return code, json.loads(text) if text.strip() else None, stderr.getvalue()

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_add_stores_the_delegate_config_and_relays_the_result(world: World) -> None:
    code, out, err = world.call("ADD", RUNTIME_EXTRA="kept")
    assert code == 0 and out == {"cniVersion": "1.0.0", "ips": [{"address": "10.5.72.2/24"}]}
    [call] = world.calls()
    assert (call["command"], call["cid"], call["ifname"]) == ("ADD", "c1", "eth0")
    assert call["netns"] == "/var/run/netns/does-not-exist" and call["extra"] == "kept"
    stored = (world.data_dir / "c1").read_text()
    assert stored == call["stdin"]  # exactly what the delegate got
    assert json.loads(stored)["ipam"]["ranges"] == [[{"subnet": "10.5.72.0/24"}]]
    assert stat.S_IMODE((world.data_dir / "c1").stat().st_mode) == 0o600
    assert "netconf sent to delegate plugin" in err


def test_del_uses_the_stored_config_even_after_subnet_env_is_gone(world: World) -> None:
    assert world.call("ADD")[0] == 0
    added = world.calls()[0]["stdin"]
    world.subnet_file.unlink()  # e.g. the node rebooted and the agent is not up yet
    code, out, _ = world.call("DEL", CNI_NETNS="")
    assert (code, out) == (0, None)
    assert world.calls()[1]["command"] == "DEL" and world.calls()[1]["stdin"] == added
    assert not (world.data_dir / "c1").exists()
    # a second DEL: nothing stored, success without calling the delegate
    assert world.call("DEL")[:2] == (0, None) and len(world.calls()) == 2


def test_del_of_an_unknown_container_succeeds(world: World) -> None:
    assert world.call("DEL", cid="never-added")[:2] == (0, None)
    assert world.calls() == []


def test_delegate_error_relayed_with_its_exit_status_and_config_kept(world: World) -> None:
    code, out, _ = world.call("ADD", FAKE_FAIL="json")
    assert code == 3 and out == {"cniVersion": "1.0.0", "code": 7, "msg": "fake says no"}
    assert (world.data_dir / "c1").exists()  # the runtime's DEL after a failed ADD needs it
    code, out, _ = world.call("DEL", FAKE_FAIL="silent")
    assert code == 2 and out["code"] == 999 and "crashed" in out["msg"]
    assert (world.data_dir / "c1").exists()  # kept so that a retried DEL can still work
    assert world.call("DEL")[0] == 0 and not (world.data_dir / "c1").exists()


def test_check_passes_prev_result_to_the_delegate(world: World) -> None:
    assert world.call("ADD")[0] == 0
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.5.72.2/24"}]}
    code, out, _ = world.call("CHECK", world.conf(prevResult=prev))
    assert (code, out) == (0, None)
    sent = json.loads(world.calls()[1]["stdin"])
    assert world.calls()[1]["command"] == "CHECK" and sent["prevResult"] == prev
    assert sent["type"] == "bridge" and sent["name"] == "cbr0"


def test_check_of_an_unknown_container_is_code_3(world: World) -> None:
    code, out, _ = world.call("CHECK", cid="nope")
    assert code == 1 and out["code"] == 3 and "nope" in out["msg"]


def test_missing_subnet_env_is_try_again_later_naming_the_file(world: World) -> None:
    world.subnet_file.unlink()
    code, out, _ = world.call("ADD")
    assert code == 1 and out["code"] == 11 and str(world.subnet_file) in out["msg"]
    assert out["cniVersion"] == "1.0.0"
    assert world.calls() == [] and not (world.data_dir / "c1").exists()


def test_malformed_subnet_env_is_code_6_naming_the_file(world: World) -> None:
    world.subnet_file.write_text("FLANNEL_SUBNET=banana\n")
    code, out, _ = world.call("ADD")
    assert code == 1 and out["code"] == 6 and str(world.subnet_file) in out["msg"]


def test_delegate_not_in_cni_path(world: World) -> None:
    code, out, _ = world.call("ADD", world.conf(delegate={"type": "macvlan"}))
    assert code == 1 and out["code"] == 999
    assert 'failed to find plugin "macvlan"' in out["msg"] and str(world.bin) in out["msg"]
    assert not (world.data_dir / "c1").exists()


def test_bad_stdin_and_env_through_run(world: World) -> None:
    stdout = io.BytesIO()
    code = run({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0",
                "CNI_PATH": str(world.bin)}, io.BytesIO(b"{oops"), stdout, io.StringIO())
    doc = json.loads(stdout.getvalue())
    assert code == 1 and doc["code"] == 6 and doc["cniVersion"] == "1.1.0"
    code, out, _ = world.call("ADD", CNI_IFNAME="")
    assert code == 1 and out["code"] == 4 and "CNI_IFNAME" in out["msg"]
    code, out, _ = world.call("ADD", world.conf(cniVersion="0.0.9"))
    assert code == 1 and out["code"] == 1


def test_add_into_our_own_netns_is_refused(world: World) -> None:
    code, out, _ = world.call("ADD", CNI_NETNS="/proc/self/ns/net")
    assert code == 1 and out["code"] == 8 and world.calls() == []


def test_status_and_gc(world: World) -> None:
    assert world.call("STATUS", world.conf(cniVersion="1.1.0"))[:2] == (0, None)
    assert world.call("GC", world.conf(cniVersion="1.1.0"))[:2] == (0, None)
    world.subnet_file.unlink()
    code, out, _ = world.call("STATUS", world.conf(cniVersion="1.1.0"))
    assert code == 1 and out["code"] == 50 and str(world.subnet_file) in out["msg"]
    code, out, _ = world.call("STATUS")  # 1.0.0 has no STATUS
    assert code == 1 and out["code"] == 1


def test_console_script_version_and_about() -> None:
    """The installed entry point (``python -m control.cni`` when the script is not there)."""
    script = os.path.join(os.path.dirname(sys.executable), "flannelette-cni")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "control.cni"]
    env = {**os.environ, "CNI_COMMAND": "VERSION"}
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0 and json.loads(res.stdout)["cniVersion"] == "1.1.0"
    env.pop("CNI_COMMAND")
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 0 and res.stdout == ""
    assert "CNI protocol versions supported: 0.1.0" in res.stderr
