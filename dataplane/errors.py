"""The dataplane's one error base class, and the local faults that derive from it.

Remote faults (a malformed packet) are never exceptions: they are counted drops
(:class:`dataplane.wire.DropReason`). Exceptions are for local mistakes: a bad
flag, a bad MAC string, a TUN device that cannot be opened.
"""

from __future__ import annotations


class DataplaneError(Exception):
    """Base class of every error the dataplane raises."""


class ConfigError(DataplaneError, ValueError):
    """A bad engine setting or command-line value; the message names it."""


class DeviceError(DataplaneError, OSError):
    """The TUN device or the UDP socket could not be set up."""
