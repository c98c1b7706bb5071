"""The change monitor's filter: our own route events never wake the agent, others' do."""

from __future__ import annotations

import struct

from control.netlink import RT_PROTO, relevant_events

RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_DELROUTE, NLMSG_DONE = 16, 20, 24, 25, 3


def route_msg(mtype: int, proto: int, pad_attrs: int = 8) -> bytes:
    """nlmsghdr + rtmsg (family, dst_len, src_len, tos, table, protocol, scope, type, flags)."""
    body = struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, proto, 0, 1, 0) + b"\0" * pad_attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def other_msg(mtype: int, size: int = 13) -> bytes:
    body = b"\1" * size  # not a multiple of 4: the next message starts aligned
    return struct.pack("=IHHII", 16 + size, mtype, 0, 0, 0) + body + b"\0" * (-size % 4)


def test_own_route_events_are_ignored():
    buf = route_msg(RTM_NEWROUTE, RT_PROTO) + route_msg(RTM_DELROUTE, RT_PROTO)
    assert relevant_events(buf) == 0


def test_other_route_link_and_address_events_count():
    buf = (route_msg(RTM_NEWROUTE, 4) + other_msg(RTM_NEWLINK) + route_msg(RTM_NEWROUTE, RT_PROTO)
           + other_msg(RTM_NEWADDR) + route_msg(RTM_DELROUTE, 2))
    assert relevant_events(buf) == 4


def test_control_messages_and_garbage_do_not_count_or_crash():
    assert relevant_events(other_msg(NLMSG_DONE)) == 0
    assert relevant_events(b"") == 0
    assert relevant_events(b"\x03\0\0\0" + b"\0" * 12) == 0  # length below header size
    # A cut-off route message may be anybody's: re-evaluating needlessly beats missing one.
    truncated = route_msg(RTM_NEWROUTE, RT_PROTO)[:20]
    assert relevant_events(truncated) == 1
    assert relevant_events(route_msg(RTM_NEWROUTE, 4, pad_attrs=0), own_proto=4) == 0
