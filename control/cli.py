"""`flannelette` command line: a thin dispatcher to each subcommand's own ``main``.

Subcommands are imported lazily, by an explicit table (no registration by import
side effect), so `flannelette status` does not pay for pyroute2 or an etcd client.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("control.agent", "main", "run the node agent (flanneld's job)"),
    "status": ("control.status", "main", "show a running agent's node, peers and counters"),
    "cleanup": ("control.cleanup", "main", "remove every device, route and rule the node made"),
    "capture": ("control.debugcli", "capture_main",
                "write the packets crossing the engine, with verdicts, as pcapng"),
    "trace": ("control.debugcli", "trace_main", "one line per packet crossing the engine, live"),
    "drops": ("control.debugcli", "drops_main", "the last dropped packets per reason, decoded"),
    "explain": ("control.debugcli", "explain_main",
                "what this node would do with a packet, step by step"),
    "inject": ("control.inject", "main", "send a crafted VXLAN datagram to a peer or to us"),
    "engine": ("dataplane.standalone", "main", "run the VXLAN engine with a static peer set"),
    "demo": ("benchmarks.demo", "main", "walk through host-gw, vxlan and vxlan+DirectRouting"),
    "bench": ("benchmarks.bench", "main", "measure throughput, packet rate, latency and scale"),
}


def _usage() -> str:
    lines = ["usage: flannelette <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "`flannelette <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"flannelette: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    return func(rest)


if __name__ == "__main__":
    sys.exit(main())
