"""Live reconfiguration: what a new ``<prefix>/config`` means for a running node (pure).

Flannel reads its config once; changing the backend means restarting every
node (the seed's procedure). The agent watches the key instead and asks
:func:`plan_change` what to do with each new value:

* the backend type or DirectRouting changed: switch in place (engine started or
  stopped, lease re-published with the new BackendType, routes re-planned);
* vxlan options that the engine is built with (VNI, Port, MTU) changed: the
  engine is restarted in place;
* only SubnetMin/SubnetMax changed and our lease still fits: take the new config
  (it matters only for a later re-acquisition);
* Network or SubnetLen changed, or our lease no longer fits: refused with one
  clear line. The containers on this node are addressed from the lease, so a
  new subnet needs a restart of the node (and its containers), not a live swap;
* the text is not a valid config: rejected with flannel's message, the running
  config stays;
* the key was deleted (the first step of the seed's procedure): the running
  config stays, with a warning.

Text in, a frozen :class:`ConfigChange` out; no I/O. An applied change carries
the ordered :class:`Step` tuple that carries it out; ``control/follower.py`` runs
exactly those steps, in that order, and decides nothing itself.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from control.config import Backend, BackendType, NetworkConfig, parse_config
from control.errors import ConfigError


class Action(enum.Enum):
    """What the agent does with a new config value."""

    NONE = "none"  # nothing that matters changed (e.g. the same text written again)
    APPLY = "apply"  # switch to ``ConfigChange.config`` in place
    REJECT = "reject"  # invalid or not applicable live: keep the running config, log an error
    DELETED = "deleted"  # the key is gone: keep the running config, log a warning


class EngineStep(enum.Enum):
    """What happens to the userspace VXLAN engine."""

    KEEP = "keep"
    START = "start"  # host-gw -> vxlan
    STOP = "stop"  # vxlan -> host-gw (after the routes left the TUN)
    RESTART = "restart"  # VNI, Port or MTU changed


class Step(enum.Enum):
    """One step of an applied change; :attr:`ConfigChange.steps` says which, in order.

    The order is what makes a switch lossless: a route may point into the TUN only
    while its engine runs, so the engine starts before routes are planned and stops
    only after they left it; the lease says the new BackendType only once this node
    forwards that way.
    """

    STOP_ENGINE = "stop engine"  # first for a restart (the new one needs the UDP port and
    #                              maybe the TUN name); last but one for vxlan -> host-gw
    START_ENGINE = "start engine"  # with the new VNI/Port/MTU
    TAKE_CONFIG = "take config"  # the node runs the new config (and MTU) from here on
    WRITE_SUBNET_ENV = "write subnet.env"  # the MTU CNI hands to containers changed
    FILTER_PEERS = "filter peers"  # the peer watch hands out leases of the new BackendType
    PROGRAM_ROUTES = "program routes"  # paths re-planned, kernel routes and engine updated
    REPUBLISH_LEASE = "republish lease"  # our lease value with the new BackendType/VNI


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """The verdict on one new config value.

    ``config`` is what the node runs afterwards (the old one unless APPLY);
    ``message`` is the one log line; ``changes`` names each field that changed.
    """

    action: Action
    config: NetworkConfig
    message: str
    changes: tuple[str, ...] = ()
    engine: EngineStep = EngineStep.KEEP
    republish_lease: bool = False  # BackendType or VNI in our lease value changes
    mtu: int | None = None  # the overlay MTU after the change (APPLY only)
    steps: tuple[Step, ...] = ()  # APPLY only: what to do, in this order

    @property
    def switches_backend(self) -> bool:
        return self.engine is not EngineStep.KEEP or any(
            c.startswith(("backend ", "DirectRouting")) for c in self.changes)


def backend_label(backend: Backend) -> str:
    """``vxlan``, ``vxlan + DirectRouting`` or ``host-gw``, as logs say it."""
    if backend.type is BackendType.VXLAN and backend.direct_routing:
        return "vxlan + DirectRouting"
    return backend.type


def _backend_changes(old: Backend, new: Backend) -> list[str]:
    out: list[str] = []
    if old.type != new.type:
        out.append(f"backend {old.type} -> {new.type}")
    if old.direct_routing != new.direct_routing and new.type is BackendType.VXLAN:
        out.append(f"DirectRouting {str(old.direct_routing).lower()} -> "
                   f"{str(new.direct_routing).lower()}")
    if old.type is new.type is BackendType.VXLAN:
        for name, a, b in (("VNI", old.vni, new.vni), ("Port", old.port, new.port),
                           ("MTU", old.mtu, new.mtu), ("GBP", old.gbp, new.gbp),
                           ("Learning", old.learning, new.learning)):
            if a != b:
                out.append(f"{name} {a} -> {b}")
    return out


def _engine_step(old: NetworkConfig, new: NetworkConfig, iface_mtu: int) -> EngineStep:
    was = old.backend.type is BackendType.VXLAN
    now = new.backend.type is BackendType.VXLAN
    if was and not now:
        return EngineStep.STOP
    if now and not was:
        return EngineStep.START
    if now and (old.backend.vni != new.backend.vni or old.backend.port != new.backend.port
                or old.mtu_for(iface_mtu) != new.mtu_for(iface_mtu)):
        return EngineStep.RESTART
    return EngineStep.KEEP


def plan_steps(old: NetworkConfig, new: NetworkConfig, engine: EngineStep, republish: bool,
               iface_mtu: int) -> tuple[Step, ...]:
    """The ordered steps that take a node from ``old`` to ``new`` (see :class:`Step`)."""
    steps: list[Step] = []
    if engine is EngineStep.RESTART:
        steps += [Step.STOP_ENGINE, Step.START_ENGINE]
    elif engine is EngineStep.START:
        steps.append(Step.START_ENGINE)
    steps.append(Step.TAKE_CONFIG)
    if old.mtu_for(iface_mtu) != new.mtu_for(iface_mtu):
        steps.append(Step.WRITE_SUBNET_ENV)
    type_changed = old.backend.type is not new.backend.type
    if type_changed:
        steps.append(Step.FILTER_PEERS)
    paths_changed = (type_changed or old.backend.direct_routing != new.backend.direct_routing)
    if paths_changed or engine is not EngineStep.KEEP:  # a new TUN has none of our routes
        steps.append(Step.PROGRAM_ROUTES)
    if engine is EngineStep.STOP:
        steps.append(Step.STOP_ENGINE)
    if republish:
        steps.append(Step.REPUBLISH_LEASE)
    return tuple(steps)


def plan_change(old: NetworkConfig, text: str | bytes | None, *,
                own_subnet: ipaddress.IPv4Network | None, iface_mtu: int,
                key: str = "<prefix>/config") -> ConfigChange:
    """The verdict on ``text`` (None: the key was deleted) for a node running ``old``.

    ``own_subnet`` is our lease (None while we hold none), ``iface_mtu`` the
    external interface's MTU (the overlay MTU depends on it), ``key`` names the
    etcd key in messages.
    """
    running = backend_label(old.backend)
    if text is None:
        return ConfigChange(Action.DELETED, old,
                            f"the network config at {key} was deleted; keeping the running "
                            f"config (Network {old.network}, backend {running})")
    try:
        new = parse_config(text)
    except ConfigError as exc:
        return ConfigChange(Action.REJECT, old,
                            f"new network config at {key} rejected, keeping the running one "
                            f"(Network {old.network}, backend {running}): {exc}")
    if new == old:
        return ConfigChange(Action.NONE, old, f"network config at {key} rewritten, unchanged")
    if new.network != old.network or new.subnet_len != old.subnet_len:
        what = []
        if new.network != old.network:
            what.append(f"Network {old.network} -> {new.network}")
        if new.subnet_len != old.subnet_len:
            what.append(f"SubnetLen /{old.subnet_len} -> /{new.subnet_len}")
        fits = own_subnet is not None and own_subnet.subnet_of(new.network) and \
            new.contains_subnet(own_subnet)
        why = (f"our lease {own_subnet} does not fit it" if own_subnet is not None and not fits
               else "routes, masquerade rules and container addresses are built from it")
        return ConfigChange(Action.REJECT, old,
                            f"new network config at {key} changes {', '.join(what)}; "
                            f"that cannot be applied while running ({why}): keeping the "
                            f"running config; restart the agents (and re-address the "
                            f"containers) to use it", tuple(what))
    if own_subnet is not None and not new.contains_subnet(own_subnet):
        return ConfigChange(Action.REJECT, old,
                            f"new network config at {key} puts our lease {own_subnet} outside "
                            f"SubnetMin {new.subnet_min} .. SubnetMax {new.subnet_max}; keeping "
                            f"the running config; restart the agent to take a new lease")
    changes = _backend_changes(old.backend, new.backend)
    if new.subnet_min != old.subnet_min:
        changes.append(f"SubnetMin {old.subnet_min} -> {new.subnet_min}")
    if new.subnet_max != old.subnet_max:
        changes.append(f"SubnetMax {old.subnet_max} -> {new.subnet_max}")
    if not changes:  # e.g. DirectRouting flipped under host-gw, where it means nothing
        return ConfigChange(Action.NONE, new, f"network config at {key} changed nothing "
                            "this node uses")
    engine = _engine_step(old, new, iface_mtu)
    republish = (old.backend.type is not new.backend.type
                 or (new.backend.type is BackendType.VXLAN
                     and old.backend.vni != new.backend.vni))
    after = backend_label(new.backend)
    verb = (f"switching backend {running} -> {after} in place" if after != running
            else f"applying in place (backend {after})")
    return ConfigChange(Action.APPLY, new,
                        f"network config at {key} changed ({'; '.join(changes)}): {verb}",
                        tuple(changes), engine, republish, new.mtu_for(iface_mtu),
                        plan_steps(old, new, engine, republish, iface_mtu))
