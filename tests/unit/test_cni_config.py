"""CNI plugin rules without root: subnet.env variants -> the delegate config flannel builds,
the spec's error documents for bad files, bad stdin and bad environments, VERSION."""

from __future__ import annotations

import json

import pytest

from control.cni_config import (
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    add_result,
    check_conf,
    check_version,
    cmd_args,
    decode_netconf,
    delegate_conf,
    delegate_failure,
    flannel_conf,
    parse_cidr,
    parse_subnet_env,
    render_delegate,
    route_gateways_filled,
    stored_delegate,
    version_json,
)

ENV = ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
       "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
PATH = "/run/flannel/subnet.env"


def build(netconf: dict[str, object], env_text: str = ENV) -> dict[str, object]:
    conf = flannel_conf(decode_netconf(json.dumps(netconf).encode()))
    return delegate_conf(conf, parse_subnet_env(env_text, PATH))


def error_of(fn: object, *args: object) -> CniError:
    assert callable(fn)
    with pytest.raises(CniError) as info:
        fn(*args)
    return info.value


# ---- the delegate config --------------------------------------------------------------------
def test_minimal_netconf_gives_flannels_bridge_config_byte_for_byte() -> None:
    delegate = build({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel"})
    # What flannel's plugin (Go json.Marshal of its map: keys sorted) sends to bridge.
    assert render_delegate(delegate) == (
        b'{"cniVersion":"1.0.0","ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.5.72.0/24"}]],'
        b'"routes":[{"dst":"10.5.0.0/16"}],"type":"host-local"},"isGateway":true,'
        b'"mtu":1450,"name":"cbr0","type":"bridge"}')


def test_defaults_for_subnet_file_and_data_dir_and_overrides() -> None:
    conf = flannel_conf(decode_netconf(b'{"name":"n","type":"flannel"}'))
    assert (conf.subnet_file, conf.data_dir) == ("/run/flannel/subnet.env",
                                                 "/var/lib/cni/flannel")
    conf = flannel_conf(decode_netconf(
        b'{"name":"n","SubnetFile":"/tmp/s.env","datadir":"/tmp/d"}'))  # Go: case-insensitive
    assert (conf.subnet_file, conf.data_dir) == ("/tmp/s.env", "/tmp/d")


def test_ipmasq_true_means_the_bridge_does_not_masquerade() -> None:
    delegate = build({"name": "n"}, ENV.replace("IPMASQ=false", "IPMASQ=true"))
    assert delegate["ipMasq"] is False
    # anything but the exact string "true" is false, as in Go
    assert build({"name": "n"}, ENV.replace("IPMASQ=false", "IPMASQ=TRUE"))["ipMasq"] is True


def test_delegate_values_win_over_subnet_env() -> None:
    delegate = build({"name": "n", "delegate": {"ipMasq": False, "mtu": 1400,
                                                 "isGateway": False, "bridge": "cni1"}})
    assert (delegate["ipMasq"], delegate["mtu"], delegate["isGateway"]) == (False, 1400, False)
    assert delegate["bridge"] == "cni1"


def test_non_bridge_delegate_gets_no_is_gateway() -> None:
    delegate = build({"name": "n", "delegate": {"type": "ipvlan", "master": "eth0"}})
    assert delegate["type"] == "ipvlan" and "isGateway" not in delegate
    assert delegate["master"] == "eth0"


def test_no_cni_version_leaves_the_delegate_without_one() -> None:
    delegate = build({"name": "n"})
    assert "cniVersion" not in delegate
    conf = flannel_conf(decode_netconf(b'{"name":"n"}'))
    assert conf.version == "0.1.0"


def test_kubernetes_manifest_plugin_config() -> None:
    # flannel's kube-flannel.yml conflist, as libcni hands its first plugin to us
    delegate = build({"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel",
                      "delegate": {"hairpinMode": True, "isDefaultGateway": True}})
    assert delegate["hairpinMode"] is True and delegate["isDefaultGateway"] is True
    assert delegate["isGateway"] is True and delegate["type"] == "bridge"
    assert delegate["name"] == "cbr0" and delegate["cniVersion"] == "0.3.1"


def test_runtime_config_is_passed_to_the_delegate() -> None:
    rc = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert build({"name": "n", "runtimeConfig": rc})["runtimeConfig"] == rc
    assert "runtimeConfig" not in build({"name": "n", "runtimeConfig": None})
    assert build({"name": "n", "runtimeConfig": {}})["runtimeConfig"] == {}


def test_ipam_section_is_completed_not_replaced() -> None:
    delegate = build({"name": "n", "ipam": {
        "dataDir": "/tmp/ipam", "ranges": [[{"subnet": "192.0.2.0/24"}]],
        "routes": [{"dst": "10.99.0.0/16", "gw": "10.5.72.254", "junk": 1}]}})
    ipam = delegate["ipam"]
    assert ipam == {"type": "host-local", "dataDir": "/tmp/ipam",
                    "ranges": [[{"subnet": "10.5.72.0/24"}]],
                    "routes": [{"dst": "10.99.0.0/16", "gw": "10.5.72.254"},
                               {"dst": "10.5.0.0/16"}]}
    assert build({"name": "n", "ipam": {"type": "static"}})["ipam"]["type"] == "static"  # type: ignore[index]


def test_bad_ipam_routes_are_invalid_config() -> None:
    for routes in ("x", ["x"], [{"gw": "10.0.0.1"}], [{"dst": "10.0.0.0"}]):
        err = error_of(build, {"name": "n", "ipam": {"routes": routes}})
        assert err.code == Code.INVALID_NETWORK_CONFIG and "ipam.routes" in err.msg


@pytest.mark.parametrize(("delegate", "words"), [
    ({"name": "x"}, "must not have 'name'"),
    ({"ipam": {}}, "must not have 'ipam'"),
    ({"type": 5}, "(string) 'type'"),
])
def test_delegate_rules(delegate: dict[str, object], words: str) -> None:
    err = error_of(build, {"name": "n", "delegate": delegate})
    assert err.code == Code.INVALID_NETWORK_CONFIG and words in err.msg


def test_several_networks_deduplicated_and_dual_stack() -> None:
    env = ("FLANNEL_NETWORK=10.5.0.0/16,10.6.0.0/16,10.5.1.2/16\n"
           "FLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\n"
           "FLANNEL_IPV6_SUBNET=fd00:0:0:12::1/64\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n")
    ipam = build({"name": "n"}, env)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.5.72.0/24"}],  # type: ignore[index]
                              [{"subnet": "fd00:0:0:12::/64"}]]
    assert ipam["routes"] == [{"dst": "10.5.0.0/16"}, {"dst": "10.6.0.0/16"},  # type: ignore[index]
                              {"dst": "fd00::/56"}]


def test_ipv6_only_subnet_env_is_enough() -> None:
    env = ("FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:12::1/64\n"
           "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n")
    fenv = parse_subnet_env(env, PATH)
    assert fenv.subnet is None and fenv.networks == ()
    assert build({"name": "n"}, env)["ipam"]["ranges"] == [  # type: ignore[index]
        [{"subnet": "fd00:0:0:12::/64"}]]


def test_check_conf_adds_prev_result_to_the_stored_config() -> None:
    stored = stored_delegate(render_delegate(build({"cniVersion": "1.0.0", "name": "n"})))
    assert stored is not None
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.5.72.2/24"}]}
    doc = json.loads(check_conf(stored, prev))
    assert doc["prevResult"] == prev and doc["type"] == "bridge"
    assert "prevResult" not in json.loads(check_conf(stored, None))
    assert stored_delegate(b"not json") is None
    assert stored_delegate(b'{"name":"n"}') is None  # no type: nothing to delegate to


def test_check_names_the_gateway_of_gatewayless_routes() -> None:
    # bridge installs "10.5.0.0/16 via 10.5.72.1"; Debian's plugins (1.1.1) compare the
    # result's gw-less route literally on CHECK, so CHECK's prevResult names the gateway.
    prev = {"cniVersion": "1.0.0",
            "ips": [{"address": "10.5.72.2/24", "gateway": "10.5.72.1", "interface": 2},
                    {"address": "fd00:0:0:12::2/64", "gateway": "fd00:0:0:12::1"}],
            "routes": [{"dst": "10.5.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.5.72.254"},
                       {"dst": "fd00::/56"}, {"dst": "bogus"}]}
    filled = route_gateways_filled(prev)
    assert filled["routes"] == [{"dst": "10.5.0.0/16", "gw": "10.5.72.1"},
                                {"dst": "0.0.0.0/0", "gw": "10.5.72.254"},
                                {"dst": "fd00::/56", "gw": "fd00:0:0:12::1"}, {"dst": "bogus"}]
    assert prev["routes"][0] == {"dst": "10.5.0.0/16"}  # the runtime's copy is untouched
    assert route_gateways_filled({"cniVersion": "1.0.0"}) == {"cniVersion": "1.0.0"}
    sent = json.loads(check_conf({"type": "bridge", "name": "n"}, prev))
    assert sent["prevResult"]["routes"][0]["gw"] == "10.5.72.1"


# ---- subnet.env variants --------------------------------------------------------------------
def test_what_flannelette_run_writes_parses() -> None:
    fenv = parse_subnet_env(ENV, PATH)
    assert [str(n) for n in fenv.networks] == ["10.5.0.0/16"]
    assert str(fenv.subnet) == "10.5.72.0/24" and fenv.mtu == 1450 and fenv.ipmasq is False


def test_crlf_comments_unknown_keys_and_later_lines() -> None:
    text = ("# written by hand\r\nFOO=bar\r\nFLANNEL_NETWORK=10.5.0.0/16\r\n"
            "FLANNEL_SUBNET=10.5.72.1/24\r\nFLANNEL_MTU=1450\r\nFLANNEL_MTU=1400\r\n"
            "FLANNEL_IPMASQ=true\r\nflannel_mtu=9\r\n")
    fenv = parse_subnet_env(text, PATH)
    assert fenv.mtu == 1400 and fenv.ipmasq is True


def test_missing_variables_are_named_with_the_file() -> None:
    err = error_of(parse_subnet_env, "FLANNEL_SUBNET=10.5.72.1/24\n", "/x/subnet.env")
    assert err.code == Code.DECODING_FAILURE
    assert "/x/subnet.env is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_MTU, " \
           "FLANNEL_IPMASQ" in err.msg
    err = error_of(parse_subnet_env, "", "/x/subnet.env")
    assert "FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET" in err.msg


@pytest.mark.parametrize(("line", "words"), [
    ("FLANNEL_SUBNET=10.5.72.1", "invalid CIDR"),
    ("FLANNEL_SUBNET=10.5.72.1/33", "invalid CIDR"),
    ("FLANNEL_SUBNET=10.5.72.1/255.255.255.0", "invalid CIDR"),
    ("FLANNEL_SUBNET=010.5.72.1/24", "invalid CIDR"),
    ("FLANNEL_SUBNET=10.5.72.1/24 ", "invalid CIDR"),
    ("FLANNEL_NETWORK=", "invalid CIDR"),
    ("FLANNEL_NETWORK=10.5.0.0/16,", "invalid CIDR"),
    ("FLANNEL_MTU=1450 ", "ParseUint"),
    ("FLANNEL_MTU=-1", "ParseUint"),
    ("FLANNEL_MTU=4294967296", "ParseUint"),
    ("FLANNEL_MTU", "has no value"),
])
def test_malformed_values_name_the_file_and_line(line: str, words: str) -> None:
    key = line.partition("=")[0]
    lines = [x for x in ENV.splitlines() if not x.startswith(key + "=")] + [line]
    err = error_of(parse_subnet_env, "\n".join(lines) + "\n", "/etc/x.env")
    assert err.code == Code.DECODING_FAILURE
    assert "/etc/x.env: line 4" in err.msg and words in err.msg


def test_parse_cidr_masks_like_go() -> None:
    assert str(parse_cidr("10.5.72.1/24")) == "10.5.72.0/24"
    assert str(parse_cidr("fd00::1/64")) == "fd00::/64"


# ---- stdin, environment, versions and error documents ---------------------------------------
@pytest.mark.parametrize(("data", "code"), [
    (b"", Code.DECODING_FAILURE),
    (b"{not json", Code.DECODING_FAILURE),
    (b"\xff\xfe", Code.DECODING_FAILURE),
    (b"[1, 2]", Code.DECODING_FAILURE),
    (b'{"name": 5}', Code.DECODING_FAILURE),
    (b'{"name": "n", "cniVersion": 1}', Code.DECODING_FAILURE),
    (b'{"type": "flannel"}', Code.INVALID_NETWORK_CONFIG),
    (b'{"name": "bad name"}', Code.INVALID_NETWORK_CONFIG),
])
def test_bad_stdin(data: bytes, code: Code) -> None:
    assert error_of(decode_netconf, data).code == code


@pytest.mark.parametrize("field", ["subnetFile", "dataDir", "delegate", "ipam", "runtimeConfig"])
def test_fields_of_the_wrong_type_are_invalid_config(field: str) -> None:
    doc = decode_netconf(json.dumps({"name": "n", field: 5}).encode())
    err = error_of(flannel_conf, doc)
    assert err.code == Code.INVALID_NETWORK_CONFIG and field in err.msg


def test_error_document_has_the_spec_fields() -> None:
    err = CniError(Code.TRY_AGAIN_LATER, "later", "because")
    assert json.loads(err.to_json("0.4.0")) == {"cniVersion": "0.4.0", "code": 11,
                                                "msg": "later", "details": "because"}
    assert "details" not in json.loads(CniError(7, "x").to_json())


def test_versions() -> None:
    for v in SUPPORTED_VERSIONS:
        check_version("ADD", v)
    err = error_of(check_version, "ADD", "9.9.9")
    assert err.code == Code.INCOMPATIBLE_VERSION and err.msg == "incompatible CNI versions"
    assert err.details.startswith('config is "9.9.9", plugin supports ["0.1.0" "0.2.0"')
    err = error_of(check_version, "CHECK", "0.3.1")
    assert (err.code, err.msg) == (1, "config version does not allow CHECK")
    assert error_of(check_version, "GC", "1.0.0").code == 1
    assert error_of(check_version, "CHECK", "1.0.0.0").code == Code.DECODING_FAILURE


def test_version_output() -> None:
    assert version_json() == ('{"cniVersion":"1.1.0","supportedVersions":["0.1.0","0.2.0",'
                              '"0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}\n')


BASE = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}


def test_environment_parsed() -> None:
    args = cmd_args(BASE)
    assert (args.command, args.container_id, args.ifname) == ("ADD", "abc", "eth0")
    assert args.path == ("/opt/cni/bin", "/usr/lib/cni")
    # DEL needs no netns (it may be gone already)
    assert cmd_args({**BASE, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""
    assert cmd_args({"CNI_COMMAND": "VERSION"}).command == "VERSION"


@pytest.mark.parametrize(("change", "words"), [
    ({"CNI_NETNS": "", "CNI_PATH": ""}, "required env variables [CNI_NETNS,CNI_PATH] missing"),
    ({"CNI_CONTAINERID": "../../etc"}, "invalid characters in containerID"),
    ({"CNI_CONTAINERID": "a/b"}, "invalid characters in containerID"),
    ({"CNI_IFNAME": "a-very-long-name0"}, "interface name is too long"),
    ({"CNI_IFNAME": "et h0"}, "whitespace"),
    ({"CNI_COMMAND": "FROB"}, "unknown CNI_COMMAND: FROB"),
])
def test_bad_environment(change: dict[str, str], words: str) -> None:
    err = error_of(cmd_args, {**BASE, **change})
    assert err.code == Code.INVALID_ENV and words in err.msg


# ---- relaying the delegate ------------------------------------------------------------------
def test_add_result_relayed_and_version_fixed_up() -> None:
    out = b'{"cniVersion":"1.0.0","ips":[]}'
    assert add_result(out, "1.0.0") == out + b"\n"
    assert json.loads(add_result(b'{"ips":[]}', "0.3.1"))["cniVersion"] == "0.3.1"
    assert error_of(add_result, b"oops", "1.0.0").code == Code.INTERNAL


def test_delegate_failure_documents() -> None:
    own = b'{"code":7,"msg":"bridge says no"}'
    assert delegate_failure(own, b"", 1, "1.0.0") == own + b"\n"
    doc = json.loads(delegate_failure(b"", b"segfault", 2, "1.0.0"))
    assert doc["code"] == 999 and "segfault" in doc["msg"] and "exit status 2" in doc["msg"]
    doc = json.loads(delegate_failure(b"garbage", b"", 1, "1.0.0"))
    assert "error parsing its diagnostic message" in doc["msg"]
    doc = json.loads(delegate_failure(b"", b"", 1, "0.4.0"))
    assert doc["cniVersion"] == "0.4.0" and "no error message" in doc["msg"]
