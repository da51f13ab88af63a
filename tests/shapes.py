"""Random Service shapes for the property tests of every datapath writer: every field
a datapath programs, in both families."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from controller.model import (
    Backend,
    BackendFlag,
    Frontend,
    FrontendKind,
    Protocol,
    ServiceEntry,
    ServiceFlag,
)


def rich_entry(i: int, bes: list[int], variant: int) -> ServiceEntry:
    """Service i in one of several shapes: every field the datapath programs, in
    either family (every fourth service is IPv6)."""
    v6 = i % 4 == 3
    base, be_base = (0xFD000096 << 96, 0xFD000244 << 96) if v6 else (0x0A600000, 0x0AF40000)
    backends = [Backend(ipaddress.ip_address(be_base + b), 8080,
                        BackendFlag.LOCAL if b % 2 else BackendFlag.NONE) for b in bes]
    proto = Protocol.UDP if i % 2 else Protocol.TCP
    flags = ServiceFlag.HAS_ENDPOINTS if bes else ServiceFlag.NONE
    kw: dict[str, object] = {}
    kind = [FrontendKind.CLUSTER_IP, FrontendKind.LOAD_BALANCER, FrontendKind.NODE_PORT,
            FrontendKind.EXTERNAL_IP][variant % 4]
    ip = ipaddress.ip_address(0 if kind == FrontendKind.NODE_PORT else base + i)
    if v6 and kind == FrontendKind.NODE_PORT:
        ip = ipaddress.IPv6Address(0)
    if variant % 3 == 1:  # Local: node-local backends, cluster ones kept for the twin
        flags |= ServiceFlag.LOCAL_POLICY
        if kind != FrontendKind.CLUSTER_IP:
            kw["cluster_backends"] = backends
        backends = [b for b in backends if b.flags & BackendFlag.LOCAL]
    if variant % 5 == 2:
        flags |= ServiceFlag.AFFINITY
        kw["affinity_timeout"] = 30 + i
    if variant % 2:
        flags |= ServiceFlag.MAGLEV
    if kind == FrontendKind.LOAD_BALANCER and variant % 7 < 4:
        # both families: only the frontend's own apply (canonical drops the other)
        kw["source_ranges"] = [ipaddress.ip_network(f"192.0.{n}.0/24") for n in range(variant % 3)] \
            + [ipaddress.ip_network(f"2001:db8:{n}::/48") for n in range(variant % 2)]
    return ServiceEntry.make(Frontend(ip, 30000 + i if kind == FrontendKind.NODE_PORT
                                      else 80 + i % 3, proto),
                             backends, f"ns/svc{i}", kind=kind, flags=flags, **kw)


states = st.dictionaries(st.integers(0, 12),
                         st.tuples(st.lists(st.integers(0, 15), max_size=6), st.integers(0, 20)),
                         max_size=8)
