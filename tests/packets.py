"""Building and checking raw Ethernet/IPv4/TCP/UDP frames for BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

ETH_HDR = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


def ipv4(src: str, dst: str, proto: int, payload: bytes, options: bytes = b"",
         frag_off: int = 0, ident: int = 0x1234, total_len: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    tl = total_len if total_len is not None else ihl * 4 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, ident, frag_off, 64, proto, 0,
                      ip4(src), ip4(dst)) + options
    hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
    return hdr + payload


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
    pseudo = ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, len(seg))
    c = csum(pseudo + seg)
    if proto == socket.IPPROTO_UDP and c == 0:
        c = 0xFFFF
    return seg[:off] + struct.pack("!H", c) + seg[off + 2:]


def frame(src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP,
          payload: bytes = b"data", options: bytes = b"", **kw: object) -> bytes:
    zero = bool(kw.pop("zero_udp_csum", False))
    seg = l4(proto, src, dst, sport, dport, payload, zero_udp_csum=zero)
    return ETH_HDR + ipv4(src, dst, proto, seg, options, **kw)  # type: ignore[arg-type]


@dataclass
class Parsed:
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    ip_csum_ok: bool
    l4_csum_ok: bool | None  # None: no L4 header in this packet
    l4_csum: int
    payload: bytes


def parse(pkt: bytes, with_l4: bool = True) -> Parsed:
    ip = pkt[14:]
    ihl = (ip[0] & 0xF) * 4
    tl = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    src = str(ipaddress.IPv4Address(ip[12:16]))
    dst = str(ipaddress.IPv4Address(ip[16:20]))
    ip_ok = csum(ip[:ihl]) == 0
    if not with_l4:
        return Parsed(src, dst, 0, 0, proto, ip_ok, None, 0, ip[ihl:tl])
    seg = ip[ihl:tl]
    sport, dport = struct.unpack("!HH", seg[:4])
    off = 16 if proto == socket.IPPROTO_TCP else 6
    c = struct.unpack("!H", seg[off:off + 2])[0]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    ok = (proto == socket.IPPROTO_UDP and c == 0) or csum(pseudo + seg) == 0
    hdr = 20 if proto == socket.IPPROTO_TCP else 8
    return Parsed(src, dst, sport, dport, proto, ip_ok, ok, c, seg[hdr:])
