"""Handing established flows between the eBPF datapath's conntrack and netfilter's, so
that a datapath switch resets nothing.

kube-proxy's classic modes keep a flow because netfilter's conntrack remembers its
NAT; the eBPF datapath keeps its own table. Without a handover, a switch meets every
established flow as a new one: the next datapath balances its next segment again
(to whichever backend, which answers a segment of a connection it never saw with an
RST), and netfilter's mid-stream pickup of the flow, whose reply tuple is already
another entry's, has its source port remapped by the null NAT binding (the backend
resets that too).

The rule both ways: a flow is translated by exactly one of the two at any moment,
and the one giving it up holds it until the other has it. ``KPR_CT_F_EXTERN`` on a
BPF conntrack entry says "netfilter translates this flow": the programs pass its
packets untouched.

* **eBPF -> classic** (:func:`to_netfilter`), run by the classic kpr once its rules
  are in and before it removes the BPF programs. Per flow: netfilter's entry is
  created with the flow's DNAT (and SNAT) bindings (nfct.Conntrack.add), then the
  BPF entry is marked EXTERN and its reply-side entries removed. Between the two
  steps (one syscall) the programs still translate; after them netfilter does.
  When the programs go, netfilter already holds every flow.
* **classic -> eBPF** (:class:`Takeover`): the eBPF kpr reads netfilter's NAT'd
  entries at start. Its first full sync writes each flow whose frontend and backend
  it programs into BPF conntrack as EXTERN, before the services entries make the
  programs see the frontends (ServiceMaps.apply's hook), so the programs never
  balance those flows. Once the classic rules are removed, ``finish`` takes each
  flow over: the reply-side entries are written, netfilter's entry is deleted and
  EXTERN is cleared. A segment that passes in between, untranslated and with no
  rule left to translate it, is lost and retransmitted, never reset.

IPVS (``net.ipv4.vs.conntrack=1``, as kube-proxy sets it) both ways too: a flow
handed to netfilter is translated by its conntrack NAT at PREROUTING, before IPVS
(at LOCAL_IN) could see the Service address, and IPVS's own flows are read from
IPVS's connection table (nfct.Conntrack.ipvs_flows).

Both directions cover TCP and UDP flows of pods and external clients through tc.
A host process's connection, translated by the socket programs at connect(), needs
no handover: its socket is connected to the backend itself.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller import kernel, nfct
from controller.datapaths.ebpf import loader
from controller.datapaths.ebpf.layouts import Clock
from controller.datapaths.ebpf.maps import (
    BpfMap,
    Plan,
    ServiceMaps,
    pack_addr,
    unpack_addr,
)
from controller.datapaths.node import VIP_LINKS
from controller.model import Backend, Frontend, IPAddress, Protocol
from controller.netns import in_netns

log = logging.getLogger(__name__)

C = loader.consts()
CT_F_CLOSING, CT_F_RST = C["CT_F_CLOSING"], C["CT_F_RST"]
CT_F_EXTERN, CT_F_HOLD = C["CT_F_EXTERN"], C["CT_F_HOLD"]
CT_F_FIN_REPLY = C["CT_F_FIN_REPLY"]
_CLOSED = CT_F_CLOSING | CT_F_FIN_REPLY  # a FIN each way
SVC_F_PASS_NEW, SVC_F_SYN_ONLY = C["SVC_F_PASS_NEW"], C["SVC_F_SYN_ONLY"]
BE_F_GONE = C["BE_F_GONE"]
_TUPLE = struct.Struct("=16s16sHHB3x")    # struct kpr_tuple
_CT = struct.Struct("=QII16sHHI")         # struct kpr_ct_value
_NAT = struct.Struct("=16sH2x")           # struct kpr_nat_addr
_BE = struct.Struct("=16sHBBI")           # struct kpr_backend
_SVC_FLAGS = 6                            # offset of kpr_svc_value.flags (__u16)
_BPF_NOEXIST = 1
_BPF_EXIST = 2
_UDP_SECS = 60                            # KPR_CT_LIFETIME_NONTCP
_SYN_SECS = 60                            # KPR_CT_LIFETIME_SYN
_HO_KIND = 37                             # offset of kpr_ho_key.kind
_HO_CT = C["HO_CT"]


def _has_link(name: str) -> bool:
    """Is there a link of that name in this thread's network namespace?"""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _tuple(saddr: IPAddress, daddr: IPAddress, sport: int, dport: int, proto: int) -> bytes:
    return _TUPLE.pack(pack_addr(saddr), pack_addr(daddr), socket.htons(sport),
                       socket.htons(dport), proto)


def _set(m: BpfMap, key: bytes, value: bytes, flags: int = 0) -> None:
    if kernel.map_update_elem(m.fd, ct.create_string_buffer(key, m.key_size),
                              ct.create_string_buffer(value, m.value_size), flags) != 0:
        err = ct.get_errno()
        raise OSError(err, f"{m.name}: update: {os.strerror(err)}")


def _reply_keys(f: nfct.NatFlow) -> list[tuple[str, bytes]]:
    """The reply-side entries of a flow (kpr_nat_entries): revnat, and unsnat and
    snat when it is masqueraded."""
    out = [("revnat", _tuple(f.backend, f.client, f.bport, f.cport, f.proto))]
    if f.snat is not None:
        out += [("unsnat", _tuple(f.backend, f.snat, f.bport, f.sport, f.proto)),
                ("snat", _tuple(f.client, f.backend, f.cport, f.bport, f.proto))]
    return out


def _reply_values(f: nfct.NatFlow) -> dict[str, bytes]:
    out = {"revnat": _NAT.pack(pack_addr(f.frontend), socket.htons(f.fport))}
    if f.snat is not None:
        out["unsnat"] = _NAT.pack(pack_addr(f.client), socket.htons(f.cport))
        out["snat"] = _NAT.pack(pack_addr(f.snat), socket.htons(f.sport))
    return out


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """The programs' flow lifetimes, in seconds (loader.Timeouts)."""

    tcp: int = 86400
    close_wait: int = 3600

    def of(self, proto: int, flags: int) -> int:
        if proto != socket.IPPROTO_TCP:
            return _UDP_SECS
        return self.close_wait if flags & (CT_F_CLOSING | CT_F_FIN_REPLY) else self.tcp


def _svc_flags(services: BpfMap, set_: int = 0, clear: int = 0,
               keys: list[bytes] | None = None) -> int:
    """Set and clear KPR_SVC_F_* bits on services entries (every entry, or ``keys``);
    returns how many changed."""
    kb, vb = services.items_packed()
    ks, vs = services.key_size, services.value_size
    want = set(keys) if keys is not None else None
    outk, outv = [], []
    for i in range(len(kb) // ks):
        k = kb[i * ks:(i + 1) * ks]
        if want is not None and k not in want:
            continue
        v = bytearray(vb[i * vs:(i + 1) * vs])
        old = struct.unpack_from("=H", v, _SVC_FLAGS)[0]
        new = (old | set_) & ~clear
        if new != old:
            struct.pack_into("=H", v, _SVC_FLAGS, new)
            outk.append(k)
            outv.append(bytes(v))
    return services.update_packed(b"".join(outk), b"".join(outv))


def to_netfilter(pin_dir: Path, hz: int, lifetimes: Lifetimes = Lifetimes()) -> tuple[int, int]:
    """Hand every live BPF flow of ``pin_dir`` to netfilter (see the module
    docstring); returns (handed over, failed). Runs in the node's namespace, once the
    classic datapath's rules are in, with the BPF programs still attached.

    1. Every services entry gets KPR_SVC_F_PASS_NEW: from here on the programs open
       no flow, netfilter's rules take every new one, so the table read next is
       complete.
    2. Each live flow: HOLD (its packets dropped), netfilter's entry created with
       its NAT, then EXTERN (its packets passed to netfilter) and its reply-side
       entries removed. No packet of it is ever translated by neither or both."""
    try:
        maps = loader.open_maps(pin_dir)
    except OSError:
        return 0, 0  # no eBPF state here
    t0 = time.monotonic()
    done = failed = 0
    try:
        m = {n: BpfMap(maps[n], n) for n in ("conntrack", "backends", "revnat", "snat",
                                              "unsnat", "services", "half_open")}
        _svc_flags(m["services"], set_=SVC_F_PASS_NEW)
        backends: dict[int, tuple[bytes, int, int, int, int]] = {}
        for kraw, vraw, n in m["backends"]._batches():
            for j in range(n):
                addr, port, proto, flags, gen = _BE.unpack_from(vraw, j * _BE.size)
                if proto:
                    backends[struct.unpack_from("=I", kraw, j * 4)[0]] = (
                        addr, port, proto, flags, gen)
        clock = Clock.of(hz)
        entries: list[tuple[BpfMap, bytes, bytes, bool]] = []
        for name in ("conntrack", "half_open"):
            # half_open: flows whose SYN the programs balanced; their handshake may
            # complete while this runs (the programs honour HOLD and EXTERN there too)
            mm = m[name]
            kb, vb = mm.items_packed()
            ks, vs = mm.key_size, mm.value_size
            for i in range(len(kb) // ks):
                key = kb[i * ks:(i + 1) * ks]
                if name == "half_open" and key[_HO_KIND] != _HO_CT:
                    continue
                entries.append((mm, key, vb[i * vs:i * vs + _CT.size], name == "half_open"))
        with nfct.Conntrack() as nf:
            for ctm, key, val, half in entries:
                seen, bid, sid, saddr, sport, flags, gen = _CT.unpack(val)
                if flags & (CT_F_RST | CT_F_EXTERN) or flags & _CLOSED == _CLOSED:
                    # reset, closed both ways (its last ACK is all that may follow;
                    # netfilter would keep it for TIME_WAIT), or netfilter's already
                    continue
                cli, fe, cport, fport, proto = _TUPLE.unpack(key[:_TUPLE.size - 3] + b"\0\0\0")
                life = _SYN_SECS if half else lifetimes.of(proto, flags)
                age = max(0, clock.now - seen) // clock.per_sec if clock.now >= 0 else 0
                be = backends.get(bid)
                if age >= life or be is None or be[4] != gen or (
                        be[3] & BE_F_GONE and proto != socket.IPPROTO_TCP):
                    continue  # ended, or its backend is gone
                snat = None if saddr == bytes(16) else unpack_addr(saddr)
                flow = nfct.NatFlow(proto, unpack_addr(cli), socket.ntohs(cport),
                                    unpack_addr(fe), socket.ntohs(fport), unpack_addr(be[0]),
                                    socket.ntohs(be[1]), snat,
                                    socket.ntohs(sport) if snat else 0,
                                    bool(flags & (CT_F_CLOSING | CT_F_FIN_REPLY)))
                pad = bytes(ctm.value_size - _CT.size)  # half_open: the union's rest
                try:
                    _set(ctm, key, _CT.pack(seen, bid, sid, saddr, sport, flags | CT_F_HOLD,
                                            gen) + pad, _BPF_EXIST)
                except OSError:
                    continue  # evicted, or its handshake completed, meanwhile
                try:
                    nf.add(flow, life - age)
                except OSError as e:
                    failed += 1
                    log.warning("handing flow %s to netfilter failed: %s", flow, e)
                    _set(ctm, key, val + pad)  # the programs keep it while they run
                    continue
                _set(ctm, key, _CT.pack(seen, bid, sid, saddr, sport, flags | CT_F_EXTERN,
                                        gen) + pad)
                for name, k in _reply_keys(flow):
                    if m[name].lookup(k) is not None:
                        m[name].delete([k])
                done += 1
    finally:
        for h in maps.values():
            os.close(h.fd)
    log.info("handed %d established flows from the eBPF datapath to netfilter's conntrack "
             "(%d failed, %.0f ms)", done, failed, (time.monotonic() - t0) * 1000)
    return done, failed


@dataclass
class Takeover:
    """Flows netfilter translates, taken over by the eBPF datapath (see the module
    docstring).

    1. The first full sync's hook (ServiceMaps.apply, before the services entries):
       netfilter's NAT'd entries are read, and each flow whose frontend and backend
       are programmed is written into BPF conntrack as EXTERN; the services entries
       go in with KPR_SVC_F_SYN_ONLY, so a flow netfilter opened after that read is
       left to it too.
    2. ``finish``, once the classic rules are gone (no new netfilter flow can start):
       netfilter is read again for the flows opened meanwhile; each flow is put on
       HOLD, its reply-side entries written, its netfilter entry deleted and its
       flags cleared; then SYN_ONLY is cleared."""

    hz: int
    """The programs' tick rate (0: nanoseconds)."""
    netns: str | None = None
    """The node's namespace for ctnetlink (None: this process's)."""
    guard: bool = True
    """Whether the services go in SYN_ONLY: a classic datapath's rules are in place,
    so netfilter may open flows until they are gone. Without them (a first start)
    a datagram or a non-SYN packet must not wait for rules that do not exist."""
    seeded: dict[nfct.NatFlow, bytes] = field(default_factory=dict)
    """Flow -> its BPF conntrack key."""
    flows: list[nfct.NatFlow] | None = None
    """netfilter's NAT'd flows, read by the first seed."""
    seen: int = 0
    """Flows netfilter had (read by seed and finish), for the log."""

    def _read(self) -> list[nfct.NatFlow]:
        def go() -> list[nfct.NatFlow]:
            # IPVS (kpr's or kube-proxy's, by its dummy link) translates its flows
            # itself: they come from its connection table
            ipvs = any(_has_link(name) for name in VIP_LINKS)
            with nfct.Conntrack() as nf:
                flows = list(nf.nat_flows())
                if ipvs:
                    known = set(flows)
                    flows += [f for f in nf.ipvs_flows() if f not in known]
                return flows

        try:
            flows = go() if self.netns is None else in_netns(self.netns, go)
        except Exception as e:  # noqa: BLE001 - pyroute2 raises its own and OSError
            log.warning("reading netfilter's conntrack failed: %s; the flows it "
                        "translates are not taken over", e)
            return []
        self.seen += len(flows)
        return flows

    def seed(self, maps: ServiceMaps, node_addrs: frozenset[IPAddress], conntrack: BpfMap,
             plan: Plan | None = None, flows: list[nfct.NatFlow] | None = None) -> int:
        """Write each flow whose frontend and backend are programmed (and not yet
        seeded) as an EXTERN conntrack entry, and mark ``plan``'s services entries
        SYN_ONLY; returns how many flows."""
        if plan is not None and self.guard:
            for key, v in plan.svc_write.items():
                b = bytearray(v)
                struct.pack_into("=H", b, _SVC_FLAGS,
                                 struct.unpack_from("=H", b, _SVC_FLAGS)[0] | SVC_F_SYN_ONLY)
                plan.svc_write[key] = bytes(b)
        if flows is None:
            if self.flows is None:
                self.flows = self._read()
            flows = self.flows
        now = Clock.of(self.hz).now
        n = 0
        for f in flows:
            if f in self.seeded:
                continue
            proto = Protocol(f.proto)
            b = maps.binding(Frontend(f.frontend, f.fport, proto), Backend(f.backend, f.bport))
            if b is None and f.frontend in node_addrs:  # a NodePort
                any_ip = ipaddress.ip_address("::" if f.frontend.version == 6 else "0.0.0.0")
                b = maps.binding(Frontend(any_ip, f.fport, proto), Backend(f.backend, f.bport))
            if b is None:
                continue  # not a flow of a frontend kpr programs (yet)
            sid, bid, gen = b
            key = _tuple(f.client, f.frontend, f.cport, f.fport, f.proto)
            val = _CT.pack(max(now, 0), bid, sid,
                           pack_addr(f.snat) if f.snat is not None else bytes(16),
                           socket.htons(f.sport) if f.snat is not None else 0,
                           CT_F_EXTERN | (CT_F_CLOSING if f.closing else 0), gen)
            try:
                # NOEXIST: a flow the programs already track (a restart, with
                # netfilter's entry a leftover) stays theirs
                _set(conntrack, key, val, _BPF_NOEXIST)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    log.warning("seeding flow %s: %s", f, e)
                continue
            self.seeded[f] = key
            n += 1
        return n

    def finish(self, maps: ServiceMaps, node_addrs: frozenset[IPAddress],
               m: dict[str, BpfMap]) -> tuple[int, int]:
        """Take every seeded flow from netfilter; returns (taken, failed)."""
        t0 = time.monotonic()
        self.seed(maps, node_addrs, m["conntrack"], flows=self._read())
        done = failed = 0
        now = Clock.of(self.hz).now

        def go() -> None:
            nonlocal done, failed
            ctm = m["conntrack"]
            with nfct.Conntrack() as nf:
                for f, key in self.seeded.items():
                    val = ctm.lookup(key)
                    if val is None:
                        continue
                    seen, bid, sid, saddr, sport, flags, gen = _CT.unpack(val)
                    try:
                        _set(ctm, key, _CT.pack(seen, bid, sid, saddr, sport,
                                                flags | CT_F_HOLD, gen))
                        # The reply side first: while netfilter's entry is there it
                        # translates replies before tc egress sees them (revnat then
                        # misses), and from its deletion on revnat must be in place,
                        # or a reply reaches the client from the backend's address
                        # and the client resets the connection.
                        values = _reply_values(f)
                        for name, k in _reply_keys(f):
                            _set(m[name], k, values[name])
                        nf.delete(f)
                        done += 1
                    except OSError as e:
                        failed += 1
                        log.warning("taking flow %s over from netfilter failed: %s", f, e)
                    _set(ctm, key, _CT.pack(max(now, seen), bid, sid, saddr, sport,
                                            flags & ~(CT_F_EXTERN | CT_F_HOLD), gen))

        if self.netns is None:
            go()
        else:
            in_netns(self.netns, go)
        if self.guard:
            _svc_flags(m["services"], clear=SVC_F_SYN_ONLY)
        log.info("took %d established flows over from netfilter's conntrack (%d failed; "
                 "%d NAT'd entries seen, the others not this node's Services'; %.0f ms)",
                 done, failed, self.seen, (time.monotonic() - t0) * 1000)
        self.seeded = {}
        return done, failed
