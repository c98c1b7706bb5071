"""flannelette-cni: a drop-in for flannel's CNI plugin (``"type": "flannel"``).

A runtime (containerd, CRI-O, kubelet, podman) execs it with CNI_* variables and the
network config on stdin. It reads the node's subnet.env (written by ``flannelette
run``), builds the delegate's config with :mod:`control.cni_config`, stores it under
``dataDir`` keyed by container ID (so DEL works after a reboot or a config change)
and execs the delegate (``bridge`` by default) from CNI_PATH with the same
environment, relaying its answer and exit status. This module is only that I/O;
every rule is in ``cni_config``.

Installed as the console script ``flannelette-cni``; runtimes look plugins up by
type, so it goes into the CNI bin dir under the name ``flannel`` (a symlink), see
docs/cni.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO, TextIO

from control.cni_config import (
    CURRENT_VERSION,
    SUPPORTED_VERSIONS,
    CmdArgs,
    CniError,
    Code,
    FlannelConf,
    FlannelEnv,
    about,
    add_result,
    check_conf,
    check_version,
    cmd_args,
    decode_netconf,
    delegate_conf,
    delegate_failure,
    flannel_conf,
    go_field,
    not_found_error,
    parse_subnet_env,
    plugin_name_error,
    render_delegate,
    stored_delegate,
    version_json,
)

EXEC_RETRIES = 5  # "text file busy" while a plugin binary is being replaced, as libcni


class Relay(Exception):
    """The delegate failed: its (or our) error document goes out as is, with its status."""

    def __init__(self, output: bytes, status: int) -> None:
        super().__init__("delegate failed")
        self.output = output
        self.status = status


# ---- files ------------------------------------------------------------------------------------
def read_subnet_env(path: str) -> FlannelEnv:
    """subnet.env, or a CNI error naming it: absent -> 11 (the agent has not written it
    yet, retry later), unreadable -> 5, malformed -> 6."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CniError(Code.TRY_AGAIN_LATER,
                       f"failed to load flannel 'subnet.env' file: {path} does not exist. "
                       "Is `flannelette run` running on this node?") from None
    except OSError as e:
        raise CniError(Code.IO_FAILURE, f"failed to load flannel 'subnet.env' file {path}: "
                                        f"{e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CniError(Code.DECODING_FAILURE, f"failed to load flannel 'subnet.env' file "
                                              f"{path}: not UTF-8 text") from None
    return parse_subnet_env(text, path)


def store(data_dir: str, container_id: str, payload: bytes) -> None:
    """Write the delegate config for DEL: temp file + fsync + rename, mode 0600."""
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=data_dir)  # IDs never start with "."
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(data_dir, container_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise CniError(Code.IO_FAILURE, f"failed to save the delegate config under "
                                        f"{data_dir}: {e.strerror}") from None


def load_stored(data_dir: str, container_id: str) -> bytes | None:
    """The stored delegate config, None when there is none."""
    path = os.path.join(data_dir, container_id)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(Code.IO_FAILURE, f"failed to read {path}: {e.strerror}") from None


def forget(data_dir: str, container_id: str) -> None:
    """Remove a stored config; failures are ignored (the spec lets DEL go on)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(data_dir, container_id))


# ---- processes and namespaces -----------------------------------------------------------------
def find_plugin(plugin: str, paths: Sequence[str]) -> str:
    """The first regular file named ``plugin`` in CNI_PATH (symlinks followed)."""
    err = plugin_name_error(plugin)
    if err is not None:
        raise err
    for directory in paths:
        full = os.path.join(directory, plugin)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(full).st_mode):
                return full
    raise not_found_error(plugin, paths)


def same_netns_as_us(netns: str) -> bool:
    """Whether CNI_NETNS is the plugin's own namespace (an unopenable path is not: the
    delegate will say what is wrong with it)."""
    try:
        theirs, ours = os.stat(netns), os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def exec_plugin(path: str, verb: str, payload: bytes, environ: Mapping[str, str],
                stderr: TextIO) -> subprocess.CompletedProcess[bytes]:
    """Run the delegate with our environment (CNI_COMMAND = ``verb``) and ``payload`` on
    stdin; its stderr is passed on to ours."""
    env = {**environ, "CNI_COMMAND": verb}
    for attempt in range(EXEC_RETRIES + 1):
        try:
            proc = subprocess.run([path], input=payload, capture_output=True, env=env,
                                  check=False)
            break
        except OSError as e:
            if e.errno == errno.ETXTBSY and attempt < EXEC_RETRIES:
                time.sleep(1.0)
                continue
            raise CniError(Code.INTERNAL, f"failed to exec plugin {path}: {e}") from None
    if proc.stderr:
        stderr.write(proc.stderr.decode("utf-8", "replace"))
    return proc


def delegate(path: str, verb: str, payload: bytes, environ: Mapping[str, str], version: str,
             stderr: TextIO) -> bytes:
    """Exec the delegate; its stdout on success, :class:`Relay` on failure."""
    proc = exec_plugin(path, verb, payload, environ, stderr)
    if proc.returncode != 0:
        status = proc.returncode if proc.returncode > 0 else 1
        raise Relay(delegate_failure(proc.stdout, proc.stderr, proc.returncode, version),
                    status)
    return proc.stdout


# ---- commands ---------------------------------------------------------------------------------
def cmd_add(args: CmdArgs, conf: FlannelConf, environ: Mapping[str, str],
            stderr: TextIO) -> bytes:
    if same_netns_as_us(args.netns):
        raise CniError(Code.INVALID_NETNS,
                       "plugin's netns and netns from CNI_NETNS should not be the same")
    env = read_subnet_env(conf.subnet_file)
    config = delegate_conf(conf, env)
    payload = render_delegate(config)
    stderr.write(f"delegateAdd: netconf sent to delegate plugin:\n{payload.decode()}\n")
    plugin = find_plugin(config["type"], args.path)
    store(conf.data_dir, args.container_id, payload)  # before ADD: a failed ADD gets a DEL
    out = delegate(plugin, "ADD", payload, environ, conf.version, stderr)
    return add_result(out, conf.version)


def cmd_del(args: CmdArgs, conf: FlannelConf, environ: Mapping[str, str],
            stderr: TextIO) -> bytes:
    payload = load_stored(conf.data_dir, args.container_id)
    if payload is None:
        return b""  # never added, or already deleted: success, as the spec asks
    doc = stored_delegate(payload)
    if doc is None:
        stderr.write(f"failed to parse the stored netconf of {args.container_id}; "
                     "its interface stays until the node reboots\n")
        forget(conf.data_dir, args.container_id)
        return b""
    plugin = find_plugin(doc["type"], args.path)
    delegate(plugin, "DEL", payload, environ, conf.version, stderr)
    forget(conf.data_dir, args.container_id)  # kept when DEL failed, so a retry can work
    return b""


def cmd_check(args: CmdArgs, conf: FlannelConf, environ: Mapping[str, str],
              stderr: TextIO) -> bytes:
    payload = load_stored(conf.data_dir, args.container_id)
    doc = None if payload is None else stored_delegate(payload)
    if doc is None:
        raise CniError(Code.UNKNOWN_CONTAINER,
                       f"no stored delegate config for container {args.container_id} "
                       f"in {conf.data_dir}", "was it added (ADD) through this plugin?")
    plugin = find_plugin(doc["type"], args.path)
    delegate(plugin, "CHECK", check_conf(doc, conf.prev_result), environ, conf.version, stderr)
    return b""


def cmd_status(conf: FlannelConf) -> bytes:
    """Ready when subnet.env is there and sound, i.e. ADD can succeed."""
    try:
        read_subnet_env(conf.subnet_file)
    except CniError as e:
        raise CniError(Code.PLUGIN_NOT_AVAILABLE, e.msg) from None
    return b""


def run(environ: Mapping[str, str], stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO) -> int:
    """One plugin invocation; the process's exit status."""
    version = CURRENT_VERSION  # for errors raised before the config's version is known
    try:
        if not environ.get("CNI_COMMAND"):
            stderr.write(about())
            return 0
        args = cmd_args(environ)
        if args.command == "VERSION":
            stdout.write(version_json().encode())
            return 0
        doc = decode_netconf(stdin.read())
        conf_version = go_field(doc, "cniVersion") or "0.1.0"
        check_version(args.command, conf_version)
        version = conf_version if conf_version in SUPPORTED_VERSIONS else version
        conf = flannel_conf(doc)
        if args.command == "ADD":
            out = cmd_add(args, conf, environ, stderr)
        elif args.command == "DEL":
            out = cmd_del(args, conf, environ, stderr)
        elif args.command == "CHECK":
            out = cmd_check(args, conf, environ, stderr)
        elif args.command == "STATUS":
            out = cmd_status(conf)
        else:  # GC: nothing of ours to collect beyond what DEL removes (flannel: no-op)
            out = b""
        stdout.write(out)
        return 0
    except Relay as r:
        stdout.write(r.output)
        return r.status
    except CniError as e:
        stdout.write(e.to_json(version).encode())
        return 1


def main() -> int:
    """Console-script entry point (``flannelette-cni``, or ``flannel`` in a CNI bin dir)."""
    code = run(os.environ, sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
