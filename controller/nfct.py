"""netfilter's conntrack table through ctnetlink (pyroute2's NFCTSocket): the NAT'd
flows a datapath switch hands between netfilter and the eBPF datapath.

A flow netfilter translates for a Service is one entry: its original tuple
(client -> frontend) and the NAT bindings that make its reply tuple (backend ->
client, or backend -> masquerade address when it was SNATed). Created through
ctnetlink, such an entry is given the un-NATed reply tuple and the bindings as
CTA_NAT_DST / CTA_NAT_SRC: the kernel computes the reply tuple and marks the entry
DST_NAT/SRC_NAT itself, as nf_nat does for a packet (nf_nat_setup_info). An entry
given a translated reply tuple without bindings would match the flow but translate
nothing.

Kernel quirks (6.1 and 6.18 alike):

* CTA_STATUS must repeat every bit the kernel already set (CONFIRMED, and the NAT
  bits the bindings set): ctnetlink refuses to change them, with EBUSY.
* A flow seeded ESTABLISHED has no window data; BE_LIBERAL on both directions keeps
  nf_conntrack_tcp from marking its next segments INVALID (as an entry picked up
  mid-stream with nf_conntrack_tcp_loose is).

Everything runs in the calling thread's network namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from controller.model import IPAddress

log = logging.getLogger(__name__)

# include/uapi/linux/netfilter/nf_conntrack_common.h, enum ip_conntrack_status
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
# enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h)
TCP_ESTABLISHED = 3
TCP_CLOSE_WAIT = 5
_TCP_OPEN = (1, 2, 3)          # SYN_SENT, SYN_RECV, ESTABLISHED
_TCP_CLOSING = (4, 5, 6)       # FIN_WAIT, CLOSE_WAIT, LAST_ACK (TIME_WAIT, CLOSE: ended)
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08


@dataclass(frozen=True, slots=True)
class NatFlow:
    """One flow translated for a Service, in either datapath's terms."""

    proto: int
    """IPPROTO_TCP or IPPROTO_UDP."""
    client: IPAddress
    """Source of the original direction."""
    cport: int
    """Its source port."""
    frontend: IPAddress
    """Destination the client used: a ClusterIP, a node address (NodePort), ..."""
    fport: int
    """Its port."""
    backend: IPAddress
    """The endpoint the flow was sent to."""
    bport: int
    """The endpoint's port."""
    snat: IPAddress | None = None
    """The masquerade source the backend sees (None: the client's own address)."""
    sport: int = 0
    """The masquerade source port."""
    closing: bool = False
    """A TCP flow past ESTABLISHED (a FIN was seen)."""

    @property
    def family(self) -> int:
        return socket.AF_INET if self.client.version == 4 else socket.AF_INET6


def _tuple(family: int, saddr: Any, daddr: Any, proto: int, sport: int, dport: int) -> Any:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    return NFCTAttrTuple(family=family, saddr=str(saddr), daddr=str(daddr), proto=proto,
                         sport=sport, dport=dport)


def _nat(family: int, ip: IPAddress, port: int) -> dict[str, Any]:
    v = "V4" if family == socket.AF_INET else "V6"
    return {"attrs": [[f"CTA_NAT_{v}_MINIP", str(ip)], [f"CTA_NAT_{v}_MAXIP", str(ip)],
                      ["CTA_NAT_PROTO", {"attrs": [["CTA_PROTONAT_PORT_MIN", port],
                                                   ["CTA_PROTONAT_PORT_MAX", port]]}]]}


class Conntrack:
    """ctnetlink sockets for both families (open them in the node's namespace)."""

    def __init__(self) -> None:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

        self._socks = {fam: NFCTSocket(nfgen_family=fam)
                       for fam in (socket.AF_INET, socket.AF_INET6)}

    def close(self) -> None:
        for s in self._socks.values():
            s.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nat_flows(self) -> Iterator[NatFlow]:
        """Every TCP/UDP entry netfilter destination-NATs (a Service's, or anyone
        else's: callers keep those whose frontend and backend they program)."""
        for fam, sock in self._socks.items():
            # filtered in the kernel (CTA_STATUS_MASK, 5.15+; older kernels ignore
            # it and send everything, which the loop filters the same way)
            for m in sock.dump(status=IPS_DST_NAT, status_mask=IPS_DST_NAT):
                status = m.get_attr("CTA_STATUS") or 0
                if not status & IPS_DST_NAT:
                    continue
                flow = _decode(fam, m, status)
                if flow is not None:
                    yield flow

    def ipvs_flows(self, conn_table: str = "/proc/thread-self/net/ip_vs_conn"
                   ) -> Iterator[NatFlow]:
        """The live connections IPVS translates (this thread's namespace), with
        their masquerade binding from netfilter's entry when there is one.

        IPVS's own table is read, not a dump of netfilter's: with
        ``net.ipv4.vs.conntrack=1`` IPVS rewrites its flows' reply tuple without NAT
        bindings or a DST_NAT bit (ip_vs_nfct.c, nf_conntrack_alter_reply), so only
        a dump of the whole table would find them there, and that table also holds
        every other flow of the node (a dump of a few thousand entries took 30 s
        under the VM's emulation, natively about 10 ms per thousand)."""
        try:
            with open(conn_table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            return  # no IPVS here
        for line in lines:
            flow = _ipvs_conn(line)
            if flow is None:
                continue
            got = self._get(flow)
            yield got if got is not None else flow

    def _get(self, flow: NatFlow) -> NatFlow | None:
        """netfilter's view of ``flow`` (by its original tuple), or None."""
        from pyroute2.netlink.exceptions import NetlinkError

        fam = flow.family
        try:
            msgs = self._socks[fam].entry("get", tuple_orig=_tuple(
                fam, flow.client, flow.frontend, flow.proto, flow.cport, flow.fport))
        except NetlinkError:
            return None
        for m in msgs:
            if m.get_attr("CTA_TUPLE_ORIG") is not None:
                got = _decode(fam, m, m.get_attr("CTA_STATUS") or 0)
                if got is not None and (got.backend, got.bport) == (flow.backend, flow.bport):
                    return got
        return None

    def add(self, flow: NatFlow, timeout: int) -> None:
        """Create ``flow``'s entry, already established and translated. An entry on
        the flow's translated tuple (client -> backend, picked up mid-stream while
        the eBPF datapath translated it) is removed first: its reply tuple is the
        new entry's. Raises OSError."""
        from pyroute2.netlink.exceptions import NetlinkError

        fam = flow.family
        sock = self._socks[fam]
        status = (IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED | IPS_DST_NAT
                  | IPS_DST_NAT_DONE | IPS_SRC_NAT_DONE)
        kw: dict[str, Any] = {"nat_dst": _nat(fam, flow.backend, flow.bport)}
        if flow.snat is not None:
            kw["nat_src"] = _nat(fam, flow.snat, flow.sport)
            status |= IPS_SRC_NAT
        if flow.proto == socket.IPPROTO_TCP:
            lib = {"value": (IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)}
            kw["protoinfo"] = {"attrs": [["CTA_PROTOINFO_TCP", {"attrs": [
                ["CTA_PROTOINFO_TCP_STATE", TCP_CLOSE_WAIT if flow.closing else TCP_ESTABLISHED],
                ["CTA_PROTOINFO_TCP_FLAGS_ORIGINAL", lib],
                ["CTA_PROTOINFO_TCP_FLAGS_REPLY", lib]]}]]}
        orig = _tuple(fam, flow.client, flow.frontend, flow.proto, flow.cport, flow.fport)
        reply = _tuple(fam, flow.frontend, flow.client, flow.proto, flow.fport, flow.cport)
        for attempt in range(3):
            self._delete(sock, _tuple(fam, flow.client, flow.backend, flow.proto, flow.cport,
                                      flow.bport))
            try:
                sock.entry("add", timeout=timeout, tuple_orig=orig, tuple_reply=reply,
                           status=status, **kw)
                return
            except NetlinkError as e:
                if e.code != errno.EEXIST or attempt == 2:
                    raise OSError(e.code, f"conntrack: adding {flow}: {e}") from e
                # the flow's own entry from an earlier try, or a pickup racing us
                self._delete(sock, orig)

    def delete(self, flow: NatFlow) -> bool:
        """Remove the entry of ``flow`` (by its original tuple); False if absent."""
        return self._delete(self._socks[flow.family], _tuple(
            flow.family, flow.client, flow.frontend, flow.proto, flow.cport, flow.fport))

    @staticmethod
    def _delete(sock: Any, orig: Any) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            sock.entry("del", tuple_orig=orig)
            return True
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return False
            raise OSError(e.code, f"conntrack: deleting {orig}: {e}") from e


def _addr(fam: int, ip: Any) -> IPAddress:
    return ipaddress.ip_address(ip)


def _tuples(m: Any) -> tuple[Any, Any, Any, Any] | None:
    """An entry's (original IP, original ports, reply IP, reply ports) attributes;
    None when one is missing."""
    o, r = m.get_attr("CTA_TUPLE_ORIG"), m.get_attr("CTA_TUPLE_REPLY")
    if o is None or r is None:
        return None
    t = (o.get_attr("CTA_TUPLE_IP"), o.get_attr("CTA_TUPLE_PROTO"),
         r.get_attr("CTA_TUPLE_IP"), r.get_attr("CTA_TUPLE_PROTO"))
    return None if any(a is None for a in t) else t


# ip_vs_proto_tcp.c's state names; SYN_SENT, LISTEN and SYNACK are
# IPVS's own (a SYN it forwarded, no reply yet)
_IPVS_OPEN = {"ESTABLISHED", "SYN_SENT", "SYN_RECV", "SYNACK", "LISTEN"}
_IPVS_CLOSING = {"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK"}
_IPVS_PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}


def _ipvs_addr(text: str) -> IPAddress:
    # IPv4 as 8 hex digits, IPv6 as %pI6 (ip_vs_conn_seq_show)
    return ipaddress.ip_address(text) if ":" in text else ipaddress.IPv4Address(int(text, 16))


def _ipvs_conn(line: str) -> NatFlow | None:
    """A live TCP/UDP connection of /proc/net/ip_vs_conn (``Pro FromIP FPrt ToIP
    TPrt DestIP DPrt State Expires``, ports in hex), or None."""
    f = line.split()
    if len(f) < 9 or f[0] not in _IPVS_PROTO:
        return None
    proto, state = _IPVS_PROTO[f[0]], f[7]
    if proto == socket.IPPROTO_TCP and state not in _IPVS_OPEN | _IPVS_CLOSING:
        return None  # TIME_WAIT, CLOSE: ended
    try:
        return NatFlow(proto, _ipvs_addr(f[1]), int(f[2], 16), _ipvs_addr(f[3]),
                       int(f[4], 16), _ipvs_addr(f[5]), int(f[6], 16),
                       closing=state in _IPVS_CLOSING)
    except ValueError:
        return None


def _decode(fam: int, m: Any, status: int) -> NatFlow | None:
    v = "V4" if fam == socket.AF_INET else "V6"
    t = _tuples(m)
    if t is None:
        return None
    oip, opr, rip, rpr = t
    proto = opr.get_attr("CTA_PROTO_NUM")
    if proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    closing = False
    if proto == socket.IPPROTO_TCP:
        info = m.get_attr("CTA_PROTOINFO")
        tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
        state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE") if tcp is not None else None
        if state in _TCP_CLOSING:
            closing = True
        elif state not in _TCP_OPEN:
            return None  # CLOSE, or unknown: nothing to keep
    client = _addr(fam, oip.get_attr(f"CTA_IP_{v}_SRC"))
    cport = opr.get_attr("CTA_PROTO_SRC_PORT")
    rdst = _addr(fam, rip.get_attr(f"CTA_IP_{v}_DST"))
    rdport = rpr.get_attr("CTA_PROTO_DST_PORT")
    snat = rdst if status & IPS_SRC_NAT and (rdst, rdport) != (client, cport) else None
    return NatFlow(proto, client, cport, _addr(fam, oip.get_attr(f"CTA_IP_{v}_DST")),
                   opr.get_attr("CTA_PROTO_DST_PORT"), _addr(fam, rip.get_attr(f"CTA_IP_{v}_SRC")),
                   rpr.get_attr("CTA_PROTO_SRC_PORT"), snat, rdport if snat else 0, closing)
