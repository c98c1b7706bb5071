"""The network config in etcd: found at start-up, then followed while the node runs.

:func:`find_config` waits for ``<prefix>/config`` (etcd away, key absent) with
backoff. :class:`ConfigFollower` watches the key and hands each new value to the
pure :func:`control.reconfig.plan_change`; an applied change is carried out by
running its :attr:`~control.reconfig.ConfigChange.steps` in the order given,
nothing re-derived here. The dataplane steps run on the supervisor, inside its
:meth:`~control.supervisor.Supervisor.exclusive` section, so no peer round or
subnet move interleaves with a switch. :attr:`ConfigFollower.generation` says
which version of the key the node runs (etcd revision, changes applied, whether
the newest value seen is running), for /status and ``flannelette explain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from control.backoff import Backoff
from control.config import BackendType
from control.errors import ConfigNotFound, RegistryUnavailable, ResyncRequired
from control.keeper import LeaseKeeper
from control.reconfig import Action, ConfigChange, Step, backend_label, plan_change
from control.registry import ConfigWatch, EtcdOptions, Registry, discover
from control.statusdoc import ConfigGeneration
from control.supervisor import Supervisor
from control.watch import PeerWatcher
from dataplane.errors import DataplaneError

log = logging.getLogger("flannelette.agent")


async def find_config(api: str, options: EtcdOptions, stop: asyncio.Event
                      ) -> tuple[Registry, str] | None:
    """The registry and config text, retrying while etcd is away or the key is absent;
    None if ``stop`` was set first. Each distinct trouble is logged once (then every
    10th attempt), not on every retry."""
    backoff = Backoff(base=0.5, cap=5.0)
    last_message = ""
    while not stop.is_set():
        try:
            return await discover(api, options)
        except RegistryUnavailable as exc:
            delay = backoff.failure(time.monotonic())
            message = (f"cannot reach etcd ({', '.join(options.endpoints)}): {exc}; "
                       f"retrying (unreachable for {backoff.failing_for(time.monotonic()):.0f}"
                       " s)")
        except ConfigNotFound as exc:
            delay = backoff.failure(time.monotonic())
            message = f"{exc}\nwaiting for the config to appear"
        if message.split(";")[0] != last_message.split(";")[0] or backoff.attempts % 10 == 1:
            log.error("%s", message)
        last_message = message
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return None


class ConfigFollower:
    """Applies each new ``<prefix>/config`` value in place, or says why not."""

    def __init__(self, registry: Registry, dataplane: Supervisor, keeper: LeaseKeeper,
                 watcher: PeerWatcher, *, key: str, iface_mtu: int,
                 watch_timeout: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._dp = dataplane
        self._keeper = keeper
        self._watcher = watcher
        self._key = key
        self._iface_mtu = iface_mtu
        self._watch_timeout = watch_timeout
        self._clock = clock  # Unix time, for ConfigGeneration.taken_at
        # The dataplane runs the start-up value from now on; its revision comes with the
        # first read of the key in run().
        self._generation = ConfigGeneration(key=key, api=registry.api, taken_at=clock())

    @property
    def generation(self) -> ConfigGeneration:
        """The version of the config key the node runs, as far as this follower knows."""
        return self._generation

    async def run(self, text: str) -> None:
        """Forever: watch the key (``text`` is what we started with) and apply each
        change. etcd trouble is the peer watch's to report; here it only means waiting
        and reading the key again."""
        registry = self._registry
        if not isinstance(registry, ConfigWatch):
            return
        backoff = Backoff(base=0.5, cap=5.0)
        cursor: int | None = None
        current: str | None = text
        first = True
        while True:
            try:
                if cursor is None:
                    value, cursor = await registry.get_config_rev()
                    changed, exact = value != current, False
                else:
                    event = await registry.watch_config(cursor, self._watch_timeout)
                    cursor, value, changed = event.cursor, event.value, event.changed
                    exact = True
                backoff.success()
            except ResyncRequired:
                cursor = None
                continue
            except RegistryUnavailable:
                cursor = None
                await asyncio.sleep(backoff.failure(time.monotonic()))
                continue
            if first and not changed:  # the value we started with, as of this read
                self._generation = dataclasses.replace(self._generation, revision=cursor,
                                                       latest_revision=cursor)
            first = False
            if changed:
                current = value
                await self.follow(value, cursor, exact=exact)

    async def follow(self, text: str | None, revision: int, *, exact: bool
                     ) -> ConfigChange | None:
        """:meth:`apply` the value of the key at etcd ``revision`` and record the outcome in
        :attr:`generation`; None if applying it raised (logged: a failed switch must not
        end the node)."""
        change: ConfigChange | None = None
        failure: str | None = None
        try:
            change, failure = await self._apply(text)
        except Exception as exc:
            failure = f"applying it failed: {type(exc).__name__}: {exc}"
            log.error("applying the new network config failed: %s: %s",
                      type(exc).__name__, exc)
        g = dataclasses.replace(self._generation, latest_revision=revision, latest_exact=exact)
        if change is not None and change.action is Action.NONE:
            g = dataclasses.replace(g, latest="same", note=change.message)
        elif change is not None and change.action is Action.REJECT:
            g = dataclasses.replace(g, latest="rejected", note=change.message)
        elif change is not None and change.action is Action.DELETED:
            g = dataclasses.replace(g, latest="deleted", note=change.message)
        elif change is not None and self._dp.config == change.config:
            # Taken (TAKE_CONFIG ran), even if a later step failed: the node runs it now.
            g = dataclasses.replace(g, revision=revision, revision_exact=exact,
                                    applied=g.applied + 1, taken_at=self._clock(),
                                    latest="running",
                                    note=(f"applied, but {failure}" if failure else None))
        else:
            g = dataclasses.replace(g, latest="failed",
                                    note=failure or "not applied (see the agent's log)")
        self._generation = g
        return change

    async def apply(self, text: str | None) -> ConfigChange:
        """One new config value (None: the key was deleted): plan, log, carry it out."""
        change, _ = await self._apply(text)
        return change

    async def _apply(self, text: str | None) -> tuple[ConfigChange, str | None]:
        """:meth:`apply`, and why an applied change was not carried out (None: it was)."""
        change = plan_change(self._dp.config, text, own_subnet=self._keeper.subnet,
                             iface_mtu=self._iface_mtu, key=self._key)
        failure: str | None = None
        if change.action is Action.NONE:
            log.debug("%s", change.message)
        elif change.action is Action.DELETED:
            log.warning("%s", change.message)
        elif change.action is Action.REJECT:
            log.error("%s", change.message)
        else:
            log.info("%s", change.message)
            async with self._dp.exclusive():
                failure = await self._carry_out(change)
        return change, failure

    async def _carry_out(self, change: ConfigChange) -> str | None:
        """Run ``change.steps`` in order; a failed engine start keeps the running config
        (and says so: the returned line; None when every step ran)."""
        dp, new = self._dp, change.config
        mtu = change.mtu if change.mtu is not None else dp.mtu
        for step in change.steps:
            if step is Step.STOP_ENGINE:
                await dp.stop_engine()
            elif step is Step.START_ENGINE:
                try:
                    await dp.start_engine(new, mtu)
                except (DataplaneError, OSError) as exc:
                    running = backend_label(dp.config.backend)
                    log.error("cannot apply the new network config: the VXLAN engine did not "
                              "start: %s; keeping backend %s", exc, running)
                    await self._restore()
                    return f"the VXLAN engine did not start: {exc}; kept backend {running}"
            elif step is Step.TAKE_CONFIG:
                dp.take_config(new, mtu)
                # The same lease value again: no write, but the keeper re-acquires under
                # the new config (SubnetMin/SubnetMax) from now on.
                await self._keeper.republish(self._keeper.attrs, new)
            elif step is Step.WRITE_SUBNET_ENV:
                dp.write_subnet_env()
            elif step is Step.FILTER_PEERS:
                self._watcher.set_backend_type(new.backend.type)  # hands out the new set
            elif step is Step.PROGRAM_ROUTES:
                await dp.program_routes()
            elif step is Step.REPUBLISH_LEASE:
                await self._keeper.republish(dp.lease_attrs(), new)
        return None

    async def _restore(self) -> None:
        """After a failed engine start (TAKE_CONFIG not run yet): the running config's
        engine again if it had one (a restart stopped it first), so "keeping backend
        vxlan" stays true."""
        dp = self._dp
        if dp.engine is not None or dp.config.backend.type is not BackendType.VXLAN:
            return
        try:
            await dp.start_engine(dp.config, dp.mtu)
        except (DataplaneError, OSError) as exc:
            log.error("the VXLAN engine of the running config did not start again either: %s",
                      exc)
        await dp.program_routes()
