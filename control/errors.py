"""The control plane's one error family.

Local faults (a bad flag, a bad network config) end the agent with one clear
message; remote faults (a peer's malformed lease, etcd being away) never do:
they are logged, skipped or retried.
"""

from __future__ import annotations


class ControlError(Exception):
    """Base of every error the control plane raises on purpose."""


class ConfigError(ControlError):
    """The network config (``<prefix>/config``) is missing a field or breaks a rule."""


class FlagError(ControlError):
    """A command-line flag or FLANNELD_* variable has a value we cannot use."""


class LeaseValueError(ControlError):
    """A lease key or value written by another node cannot be parsed (remote fault)."""


class AllocationError(ControlError):
    """No subnet is left to lease in SubnetMin..SubnetMax."""


class RegistryError(ControlError):
    """etcd answered, but not the way we needed (base of the registry errors)."""


class RegistryUnavailable(RegistryError):
    """etcd could not be reached or timed out; the caller backs off and retries."""


class ResyncRequired(RegistryError):
    """The watch cursor is too old (v2 EventIndexCleared, v3 compaction): re-list."""


class ConfigNotFound(RegistryError):
    """No network config under the prefix, in the API(s) we looked at."""
