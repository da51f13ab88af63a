"""Stale UDP flows in netfilter's conntrack, shared by the classic datapaths
(nftables, iptables, and IPVS: with ``net.ipv4.vs.conntrack=1`` IPVS drops a flow's
datagrams while its conntrack entry lives, even with ``expire_nodest_conn``).

netfilter keeps translating a UDP flow to the endpoint its first packet chose for as
long as the conntrack entry lives, even after the endpoint is gone. As kube-proxy
does (pkg/proxy/conntrack), a sync that removes a UDP endpoint from a frontend then
deletes those entries (``conntrack -D``), so the flow's next datagram is balanced
again to a live endpoint. TCP needs nothing: the endpoint's RST (or the client's
timeout) ends the connection.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable

from controller.model import Backend, Frontend, Protocol, ServiceEntry

log = logging.getLogger(__name__)


def udp_backends(e: ServiceEntry) -> tuple[Backend, ...]:
    """Every endpoint a UDP frontend's flows may be on: those it sends new flows to
    (local and cluster-wide) and the terminating ones still serving (draining). A
    flow's entries are deleted only once its endpoint stops serving, as kube-proxy
    does (pkg/proxy/conntrack: it clears the entries of endpoints that left the
    serving set), so a terminating pod answers its UDP clients until it goes."""
    return tuple(Backend(b.ip, b.port) for b in e.backends + e.cluster_backends + e.draining)


class UdpFlows:
    """The UDP endpoints programmed per frontend, to find those a sync removes."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._udp: dict[Frontend, tuple[Backend, ...]] = {}

    def reset(self, entries: Iterable[ServiceEntry]) -> None:
        """After a full sync: these entries are what is programmed."""
        self._udp = {e.frontend: udp_backends(e) for e in entries
                     if e.frontend.protocol == Protocol.UDP and udp_backends(e)}

    def changed(self, changes: Iterable[tuple[Frontend, ServiceEntry | None]]) -> None:
        """After a partial sync: record the new endpoints and delete the flows of
        the endpoints each changed frontend lost."""
        stale: list[tuple[Frontend, Backend]] = []
        for f, e in changes:
            if f.protocol != Protocol.UDP:
                continue
            now = set(udp_backends(e)) if e is not None else set()
            stale += [(f, b) for b in self._udp.get(f, ()) if b not in now]
            if now:
                self._udp[f] = tuple(now)
            else:
                self._udp.pop(f, None)
        self.forget(stale)

    def forget(self, stale: list[tuple[Frontend, Backend]]) -> None:
        """Delete the conntrack entries of UDP flows to endpoints a frontend lost."""
        for f, b in stale:
            argv = ["conntrack", "-D", "-f", "ipv4" if b.ip.version == 4 else "ipv6",
                    "-p", "udp", "--orig-port-dst", str(f.port), "--reply-src", str(b.ip),
                    "--reply-port-src", str(b.port)]
            if not f.ip.is_unspecified:  # a NodePort's flows went to any node address
                argv += ["--orig-dst", str(f.ip)]
            if self.netns:
                argv[:0] = ["nsenter", f"--net=/run/netns/{self.netns}"]
            try:
                # exit status 1 with "0 flow entries": there was nothing to delete
                p = subprocess.run(argv, capture_output=True, text=True)
            except OSError as e:
                log.warning("cannot clear stale UDP flows to %s (%s): %s", b, f, e)
                return
            if p.returncode not in (0, 1):
                log.warning("conntrack -D for %s (%s) failed: %s", b, f, p.stderr.strip())
