"""Building and checking raw Ethernet/IPv4/IPv6/TCP/UDP frames for BPF_PROG_TEST_RUN
(the BPF program tests, and the per-packet cost in `kpr bench`).

The family of a frame follows its addresses (an address with ":" is IPv6)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

MACS = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"
ETH_HDR = MACS + b"\x08\x00"
ETH_HDR6 = MACS + b"\x86\xdd"
NEXTHDR_HOP, NEXTHDR_FRAGMENT = 0, 44


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def ipbytes(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    """The L4 checksum's pseudo header, per family (RFC 793, RFC 8200 8.1)."""
    if ":" in src:
        return ipbytes(src) + ipbytes(dst) + struct.pack("!I3xB", length, proto)
    return ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, length)


def ipv4(src: str, dst: str, proto: int, payload: bytes, options: bytes = b"",
         frag_off: int = 0, ident: int = 0x1234, total_len: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    tl = total_len if total_len is not None else ihl * 4 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, ident, frag_off, 64, proto, 0,
                      ip4(src), ip4(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    """An IPv6 header; ``payload`` starts with any extension headers ``nexthdr`` names."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64, ipbytes(src),
                       ipbytes(dst)) + payload


def hop_by_hop(nexthdr: int) -> bytes:
    """An 8-byte hop-by-hop options header holding only padding (PadN)."""
    return struct.pack("!BB", nexthdr, 0) + b"\x01\x04\x00\x00\x00\x00"


def fragment_hdr(nexthdr: int, offset8: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset8 << 3) | int(more), ident)


def l4(proto: int, src: str, dst: str, sport: int, dport: int, payload: bytes = b"data",
       flags: int = 0x02, zero_udp_csum: bool = False) -> bytes:
    """A TCP (proto 6) or UDP (17) segment with a correct checksum."""
    if proto == socket.IPPROTO_TCP:
        seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
        off = 16
    else:
        seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        off = 6
        if zero_udp_csum:
            return seg
    c = csum(pseudo(src, dst, proto, len(seg)) + seg)
    if proto == socket.IPPROTO_UDP and c == 0:
        c = 0xFFFF
    return seg[:off] + struct.pack("!H", c) + seg[off + 2:]


def frame(src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP,
          payload: bytes = b"data", options: bytes = b"", **kw: object) -> bytes:
    zero = bool(kw.pop("zero_udp_csum", False))
    flags = int(kw.pop("flags", 0x02))  # type: ignore[call-overload]
    seg = l4(proto, src, dst, sport, dport, payload, flags=flags, zero_udp_csum=zero)
    if ":" in src:
        if options:  # extension headers: a hop-by-hop header in front
            return ETH_HDR6 + ipv6(src, dst, NEXTHDR_HOP, hop_by_hop(proto) + seg)
        return ETH_HDR6 + ipv6(src, dst, proto, seg)
    return ETH_HDR + ipv4(src, dst, proto, seg, options, **kw)  # type: ignore[arg-type]


@dataclass
class Parsed:
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    ip_csum_ok: bool  # IPv6 has no header checksum: always True
    l4_csum_ok: bool | None  # None: no L4 header in this packet
    l4_csum: int
    payload: bytes


def _l4(src: str, dst: str, proto: int, seg: bytes, ip_ok: bool, zero_ok: bool) -> Parsed:
    sport, dport = struct.unpack("!HH", seg[:4])
    off = 16 if proto == socket.IPPROTO_TCP else 6
    c = struct.unpack("!H", seg[off:off + 2])[0]
    ok = (zero_ok and proto == socket.IPPROTO_UDP and c == 0) or \
        csum(pseudo(src, dst, proto, len(seg)) + seg) == 0
    hdr = 20 if proto == socket.IPPROTO_TCP else 8
    return Parsed(src, dst, sport, dport, proto, ip_ok, ok, c, seg[hdr:])


def parse(pkt: bytes, with_l4: bool = True) -> Parsed:
    if pkt[12:14] == b"\x86\xdd":
        return parse6(pkt, with_l4)
    ip = pkt[14:]
    ihl = (ip[0] & 0xF) * 4
    tl = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    src = str(ipaddress.IPv4Address(ip[12:16]))
    dst = str(ipaddress.IPv4Address(ip[16:20]))
    ip_ok = csum(ip[:ihl]) == 0
    if not with_l4:
        return Parsed(src, dst, 0, 0, proto, ip_ok, None, 0, ip[ihl:tl])
    return _l4(src, dst, proto, ip[ihl:tl], ip_ok, zero_ok=True)


def parse6(pkt: bytes, with_l4: bool = True) -> Parsed:
    """An IPv6 frame; skips hop-by-hop and fragment headers (what the tests build)."""
    ip = pkt[14:]
    plen, nh = struct.unpack("!HB", ip[4:7])
    src = str(ipaddress.IPv6Address(ip[8:24]))
    dst = str(ipaddress.IPv6Address(ip[24:40]))
    off = 40
    while nh in (NEXTHDR_HOP, NEXTHDR_FRAGMENT):
        nxt = ip[off]
        off += 8 if nh == NEXTHDR_FRAGMENT else (ip[off + 1] + 1) * 8
        nh = nxt
    rest = ip[off:40 + plen]
    if not with_l4:
        return Parsed(src, dst, 0, 0, nh, True, None, 0, rest)
    return _l4(src, dst, nh, rest, True, zero_ok=False)
