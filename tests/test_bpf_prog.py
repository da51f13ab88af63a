"""The real BPF programs, loaded into the kernel, fed crafted packets with
BPF_PROG_TEST_RUN; verdicts and output bytes (addresses, ports, checksums) checked."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest

from controller.datapaths.ebpf.datapath import EbpfDatapath
from controller.kernel import prog_test_run
from controller.model import Backend, Frontend, Protocol, ServiceEntry, ServiceFlag, State
from tests.conftest import new_datapath
from controller.packets import (
    ETH_HDR,
    ETH_HDR6,
    NEXTHDR_FRAGMENT,
    csum,
    fragment_hdr,
    frame,
    ipv4,
    ipv6,
    l4,
    parse,
    pseudo,
)

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
CLIENT = "10.244.0.50"
CLIENT6 = "fd00:244::50"


def entry(vip: str, port: int, proto: Protocol, backends: list[tuple[str, int]]) -> ServiceEntry:
    return ServiceEntry.make(Frontend(ipaddress.ip_address(vip), port, proto),
                             [Backend(ipaddress.ip_address(a), p) for a, p in backends],
                             f"test/{vip}:{port}")


STATE = State([
    entry("10.96.0.10", 80, Protocol.TCP, [("10.244.0.11", 8080), ("10.244.0.12", 8080)]),
    entry("10.96.0.20", 80, Protocol.TCP, [("10.244.0.21", 8080)]),
    entry("10.96.0.20", 53, Protocol.UDP, [("10.244.0.21", 5353)]),
    entry("10.96.0.30", 80, Protocol.TCP, []),
    # internalTrafficPolicy Local, endpoints only on other nodes
    ServiceEntry.make(Frontend(ipaddress.ip_address("10.96.0.40"), 80, Protocol.TCP), [],
                      "test/local", flags=ServiceFlag.LOCAL_POLICY | ServiceFlag.HAS_ENDPOINTS),
    entry("fd00:96::20", 80, Protocol.TCP, [("fd00:244::21", 8080)]),
    entry("fd00:96::20", 53, Protocol.UDP, [("fd00:244::21", 5353)]),
    entry("fd00:96::30", 80, Protocol.TCP, []),
])


@pytest.fixture(scope="module")
def dp() -> Iterator[EbpfDatapath]:
    d = new_datapath()
    d.load()
    d.sync(STATE, None)
    yield d
    d.cleanup()


def ingress(dp: EbpfDatapath, pkt: bytes) -> tuple[int, bytes]:
    r = prog_test_run(dp.prog_fds["ingress"], pkt)
    return r.retval, r.data


def egress(dp: EbpfDatapath, pkt: bytes) -> tuple[int, bytes]:
    r = prog_test_run(dp.prog_fds["egress"], pkt)
    return r.retval, r.data


def test_tcp_syn_is_dnated_with_valid_checksums(dp: EbpfDatapath) -> None:
    before = dp.stats()["dnat"]
    ret, out = ingress(dp, frame(CLIENT, "10.96.0.20", 40001, 80, TCP, b"hello"))
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.src, p.sport, p.dst, p.dport) == (CLIENT, 40001, "10.244.0.21", 8080)
    assert p.ip_csum_ok and p.l4_csum_ok
    assert p.payload == b"hello"
    assert out[:14] == ETH_HDR
    assert dp.stats()["dnat"] == before + 1


def test_reply_is_reverse_nated_at_egress(dp: EbpfDatapath) -> None:
    ingress(dp, frame(CLIENT, "10.96.0.20", 40002, 80, TCP))
    ret, out = egress(dp, frame("10.244.0.21", CLIENT, 8080, 40002, TCP, b"reply"))
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.src, p.sport, p.dst, p.dport) == ("10.96.0.20", 80, CLIENT, 40002)
    assert p.ip_csum_ok and p.l4_csum_ok and p.payload == b"reply"


def test_udp_dnat_and_reply(dp: EbpfDatapath) -> None:
    ret, out = ingress(dp, frame(CLIENT, "10.96.0.20", 40003, 53, UDP, b"query"))
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.dst, p.dport) == ("10.244.0.21", 5353)
    assert p.ip_csum_ok and p.l4_csum_ok and p.l4_csum != 0
    ret, out = egress(dp, frame("10.244.0.21", CLIENT, 5353, 40003, UDP, b"answer"))
    p = parse(out)
    assert (p.src, p.sport) == ("10.96.0.20", 53) and p.ip_csum_ok and p.l4_csum_ok


def test_udp_without_checksum_keeps_zero(dp: EbpfDatapath) -> None:
    ret, out = ingress(dp, frame(CLIENT, "10.96.0.20", 40004, 53, UDP, zero_udp_csum=True))
    p = parse(out)
    assert ret == TC_ACT_OK and p.dst == "10.244.0.21" and p.dport == 5353
    assert p.l4_csum == 0 and p.ip_csum_ok


def test_non_ip_passes_untouched(dp: EbpfDatapath) -> None:
    arp = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06" + bytes(28)
    assert ingress(dp, arp) == (TC_ACT_OK, arp)
    assert egress(dp, arp) == (TC_ACT_OK, arp)


def test_ip_options_are_skipped_over(dp: EbpfDatapath) -> None:
    opts = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL: ihl = 6
    pkt = frame(CLIENT, "10.96.0.20", 40005, 80, TCP, b"opt", options=opts)
    ret, out = ingress(dp, pkt)
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.dst, p.dport, p.sport) == ("10.244.0.21", 8080, 40005)
    assert p.ip_csum_ok and p.l4_csum_ok and p.payload == b"opt"
    assert out[34:38] == opts


def test_fragments_follow_the_first_one(dp: EbpfDatapath) -> None:
    payload = bytes(range(48))
    seg = l4(UDP, CLIENT, "10.96.0.20", 40006, 53, payload)  # 56 bytes, valid checksum
    first = ETH_HDR + ipv4(CLIENT, "10.96.0.20", UDP, seg[:24], frag_off=0x2000, ident=77)
    later = ETH_HDR + ipv4(CLIENT, "10.96.0.20", UDP, seg[24:], frag_off=3, ident=77)
    ret1, out1 = ingress(dp, first)
    ret2, out2 = ingress(dp, later)
    assert ret1 == ret2 == TC_ACT_OK
    p1 = parse(out1, with_l4=False)
    p2 = parse(out2, with_l4=False)
    assert p1.dst == p2.dst == "10.244.0.21" and p1.ip_csum_ok and p2.ip_csum_ok
    assert struct.unpack("!HH", out1[34:38]) == (40006, 5353)
    assert out2[34:] == seg[24:]  # no L4 header: payload untouched
    # Reassembled, the datagram's checksum is valid for the new addresses and port.
    whole = ETH_HDR + ipv4(CLIENT, "10.244.0.21", UDP, out1[34:] + out2[34:])
    assert parse(whole).l4_csum_ok


def test_untracked_later_fragment_passes(dp: EbpfDatapath) -> None:
    before = dp.stats()["frag_miss"]
    later = ETH_HDR + ipv4(CLIENT, "10.96.0.20", UDP, bytes(16), frag_off=3, ident=999)
    assert ingress(dp, later) == (TC_ACT_OK, later)
    assert dp.stats()["frag_miss"] == before + 1


# A frame cut inside the IPv4 header itself is refused by the kernel's test-run
# harness (EINVAL before the program runs, kernel 6.18), so the cuts start after it.
@pytest.mark.parametrize("cut", [14 + 20, 14 + 20 + 6, 14 + 20 + 19])
def test_truncated_headers_pass_untouched(dp: EbpfDatapath, cut: int) -> None:
    pkt = frame(CLIENT, "10.96.0.20", 40007, 80, TCP)[:cut]
    assert ingress(dp, pkt) == (TC_ACT_OK, pkt)


def test_ihl_beyond_packet_passes_untouched(dp: EbpfDatapath) -> None:
    pkt = bytearray(frame(CLIENT, "10.96.0.20", 40008, 80, TCP))
    pkt[14] = 0x4F  # ihl 15 = 60 bytes of header, more than the packet has
    pkt = bytes(pkt[:14 + 40])
    before = dp.stats()["truncated"]
    assert ingress(dp, pkt) == (TC_ACT_OK, pkt)
    assert dp.stats()["truncated"] == before + 1


def test_unknown_address_passes_untouched(dp: EbpfDatapath) -> None:
    pkt = frame(CLIENT, "10.96.0.99", 40009, 80, TCP)
    assert ingress(dp, pkt) == (TC_ACT_OK, pkt)


def assert_port_unreachable(pkt: bytes, ret: int, out: bytes, vip: str) -> None:
    """``out`` is an ICMP port unreachable from ``vip`` quoting ``pkt``, sent back."""
    assert ret == TC_ACT_REDIRECT
    assert out[:6] == pkt[6:12] and out[6:12] == pkt[:6]  # MACs swapped
    ip = parse(out, with_l4=False)
    assert (ip.src, ip.dst, ip.proto, ip.ip_csum_ok) == (vip, CLIENT, socket.IPPROTO_ICMP, True)
    icmp = out[14 + 20:]
    assert icmp[:2] == b"\x03\x03" and csum(icmp) == 0  # type 3 code 3, valid checksum
    assert icmp[8:] == pkt[14:14 + 28]  # the offending IPv4 header + 8 bytes


@pytest.mark.parametrize("dport,proto", [(81, TCP), (80, UDP)])
def test_undefined_port_of_a_cluster_ip_is_rejected(dp: EbpfDatapath, dport: int,
                                                    proto: int) -> None:
    pkt = frame(CLIENT, "10.96.0.20", 40009, dport, proto)
    assert_port_unreachable(pkt, *ingress(dp, pkt), "10.96.0.20")


def test_service_without_endpoints_is_rejected_with_icmp(dp: EbpfDatapath) -> None:
    before = dp.stats()["reject"]
    pkt = frame(CLIENT, "10.96.0.30", 40010, 80, TCP)
    assert_port_unreachable(pkt, *ingress(dp, pkt), "10.96.0.30")
    assert dp.stats()["reject"] == before + 1


def test_local_policy_without_local_endpoints_drops(dp: EbpfDatapath) -> None:
    before = dp.stats()["drop_no_backend"]
    ret, _ = ingress(dp, frame(CLIENT, "10.96.0.40", 40011, 80, TCP))
    assert ret == TC_ACT_SHOT
    assert dp.stats()["drop_no_backend"] == before + 1


def test_flow_keeps_its_backend_and_new_flows_spread(dp: EbpfDatapath) -> None:
    first = parse(ingress(dp, frame(CLIENT, "10.96.0.10", 41000, 80, TCP))[1]).dst
    for _ in range(20):
        again = parse(ingress(dp, frame(CLIENT, "10.96.0.10", 41000, 80, TCP))[1])
        assert again.dst == first
    chosen = {parse(ingress(dp, frame(CLIENT, "10.96.0.10", 42000 + i, 80, TCP))[1]).dst
              for i in range(64)}
    assert chosen == {"10.244.0.11", "10.244.0.12"}


# ----- IPv6: the same programs, the same maps (addresses 16 bytes) -------------------

def test_ipv6_tcp_is_dnated_and_reverse_nated_with_valid_checksums(dp: EbpfDatapath) -> None:
    ret, out = ingress(dp, frame(CLIENT6, "fd00:96::20", 40101, 80, TCP, b"hello6"))
    p = parse(out)
    assert ret == TC_ACT_OK and out[:14] == ETH_HDR6
    assert (p.src, p.sport, p.dst, p.dport) == (CLIENT6, 40101, "fd00:244::21", 8080)
    assert p.l4_csum_ok and p.payload == b"hello6"
    ret, out = egress(dp, frame("fd00:244::21", CLIENT6, 8080, 40101, TCP, b"reply6"))
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.src, p.sport, p.dst, p.dport) == ("fd00:96::20", 80, CLIENT6, 40101)
    assert p.l4_csum_ok and p.payload == b"reply6"


def test_ipv6_udp_dnat_and_reply(dp: EbpfDatapath) -> None:
    ret, out = ingress(dp, frame(CLIENT6, "fd00:96::20", 40102, 53, UDP, b"query"))
    p = parse(out)
    assert ret == TC_ACT_OK and (p.dst, p.dport) == ("fd00:244::21", 5353)
    assert p.l4_csum_ok and p.l4_csum != 0
    ret, out = egress(dp, frame("fd00:244::21", CLIENT6, 5353, 40102, UDP, b"answer"))
    p = parse(out)
    assert (p.src, p.sport) == ("fd00:96::20", 53) and p.l4_csum_ok


def test_ipv6_extension_headers_are_walked(dp: EbpfDatapath) -> None:
    pkt = frame(CLIENT6, "fd00:96::20", 40103, 80, TCP, b"ext", options=b"hbh")
    ret, out = ingress(dp, pkt)
    p = parse(out)
    assert ret == TC_ACT_OK
    assert (p.dst, p.dport, p.sport) == ("fd00:244::21", 8080, 40103)
    assert p.l4_csum_ok and p.payload == b"ext"
    assert out[54:62] == pkt[54:62]  # the hop-by-hop header is kept as it was


def test_ipv6_fragments_follow_the_first_one(dp: EbpfDatapath) -> None:
    payload = bytes(range(48))
    seg = l4(UDP, CLIENT6, "fd00:96::20", 40104, 53, payload)  # 56 bytes
    first = ETH_HDR6 + ipv6(CLIENT6, "fd00:96::20", NEXTHDR_FRAGMENT,
                            fragment_hdr(UDP, 0, True, 0xABCDEF01) + seg[:24])
    later = ETH_HDR6 + ipv6(CLIENT6, "fd00:96::20", NEXTHDR_FRAGMENT,
                            fragment_hdr(UDP, 3, False, 0xABCDEF01) + seg[24:])
    ret1, out1 = ingress(dp, first)
    ret2, out2 = ingress(dp, later)
    assert ret1 == ret2 == TC_ACT_OK
    p1, p2 = parse(out1, with_l4=False), parse(out2, with_l4=False)
    assert p1.dst == p2.dst == "fd00:244::21"
    assert struct.unpack("!HH", out1[62:66]) == (40104, 5353)
    assert out2[62:] == seg[24:]  # no L4 header: payload untouched
    whole = out1[62:] + out2[62:]
    assert csum(pseudo(CLIENT6, "fd00:244::21", UDP, len(whole)) + whole) == 0


def test_ipv4_mapped_address_on_the_wire_is_not_an_ipv4_service(dp: EbpfDatapath) -> None:
    pkt = frame(CLIENT6, "::ffff:10.96.0.20", 40105, 80, TCP)
    assert ingress(dp, pkt) == (TC_ACT_OK, pkt)


def assert_port_unreachable6(pkt: bytes, ret: int, out: bytes, vip: str) -> None:
    """``out`` is an ICMPv6 port unreachable from ``vip`` quoting ``pkt``, sent back."""
    assert ret == TC_ACT_REDIRECT
    assert out[:6] == pkt[6:12] and out[6:12] == pkt[:6] and out[12:14] == b"\x86\xdd"
    ip = parse(out, with_l4=False)
    assert (ip.src, ip.dst, ip.proto) == (vip, CLIENT6, socket.IPPROTO_ICMPV6)
    icmp = out[14 + 40:]
    assert icmp[:2] == b"\x01\x04"  # type 1 (unreachable), code 4 (port)
    assert csum(pseudo(vip, CLIENT6, socket.IPPROTO_ICMPV6, len(icmp)) + icmp) == 0
    assert icmp[8:] == pkt[14:14 + 48]  # the offending IPv6 header + 8 bytes


@pytest.mark.parametrize("vip,dport", [("fd00:96::20", 80), ("fd00:96::30", 53)])
def test_ipv6_udp_reject_is_icmpv6_port_unreachable(dp: EbpfDatapath, vip: str,
                                                    dport: int) -> None:
    pkt = frame(CLIENT6, vip, 40106, dport, UDP)
    assert_port_unreachable6(pkt, *ingress(dp, pkt), vip)


@pytest.mark.parametrize("vip,dport", [("fd00:96::20", 81), ("fd00:96::30", 80)])
def test_ipv6_tcp_reject_is_a_reset(dp: EbpfDatapath, vip: str, dport: int) -> None:
    """A SYN gets <SEQ=0><ACK=ISN+1><CTL=RST,ACK> from the address it tried (an
    ICMPv6 error would be dropped by a local client's kernel: see kpr_icmp.h)."""
    pkt = frame(CLIENT6, vip, 40107, dport, TCP)  # SYN, seq 1, 4 bytes of data
    ret, out = ingress(dp, pkt)
    assert ret == TC_ACT_REDIRECT
    assert out[:6] == pkt[6:12] and out[6:12] == pkt[:6]
    p = parse(out)
    assert (p.src, p.sport, p.dst, p.dport) == (vip, dport, CLIENT6, 40107) and p.l4_csum_ok
    seq, ack, _off, flags = struct.unpack("!IIBB", out[58:68])
    assert (seq, ack, flags) == (0, 1 + 1 + 4, 0x14)  # SYN and 4 data bytes acked; RST|ACK
    # a segment with ACK set gets <SEQ=SEG.ACK><CTL=RST>; an RST is never answered
    acked = bytearray(frame(CLIENT6, vip, 40108, dport, TCP, b"", flags=0x10))
    acked[62:66] = struct.pack("!I", 777)  # ack_seq; checksum no longer checked by us
    ret, out = ingress(dp, bytes(acked))
    assert ret == TC_ACT_REDIRECT and struct.unpack("!IIBB", out[58:68])[::3] == (777, 0x04)
    assert ingress(dp, frame(CLIENT6, vip, 40109, dport, TCP, flags=0x04))[0] == TC_ACT_SHOT


@pytest.mark.parametrize("family", [4, 6])
def test_masqueraded_flow_round_trip_and_a_new_masquerade_address(family: int) -> None:
    """masqueradeAll: the client's packet is DNATed at ingress and gets the masquerade
    source at egress; the backend's reply to the masquerade address gets its client
    back at ingress (unsnat, looked up only for that address) and the frontend as
    its source at egress. After the masquerade address changes, new flows use the
    new one the same way."""
    from controller.datapaths.node import NodeNet

    v4 = family == 4
    client, vip, be = (CLIENT, "10.96.0.60", "10.244.0.61") if v4 else \
        (CLIENT6, "fd00:96::60", "fd00:244::61")
    node = ["10.0.0.1", "10.0.0.2"] if v4 else ["fd00::1", "fd00::2"]
    d = new_datapath()
    d.load()
    try:
        def node_net(snat: str) -> NodeNet:
            ips = tuple(ipaddress.ip_address(a) for a in node)
            return NodeNet(addresses=ips, nodeport=ips, snat=(ipaddress.ip_address(snat),),
                           cluster_cidrs=(), masquerade_all=True, netns_cookie=0)

        assert d.node_maps is not None
        d.node_maps.write(node_net(node[0]))
        d.sync(State([entry(vip, 80, Protocol.TCP, [(be, 8080)])]), None)
        for snat, sport in ((node[0], 40200), (node[1], 40201)):
            d.node_maps.write(node_net(snat))
            before = d.stats()
            ret, out = ingress(d, frame(client, vip, sport, 80, TCP, b"req"))
            p = parse(out)
            assert ret == TC_ACT_OK and (p.dst, p.dport) == (be, 8080) and p.l4_csum_ok
            ret, out = egress(d, out)
            p = parse(out)
            assert ret == TC_ACT_OK and p.src == snat and (p.dst, p.dport) == (be, 8080)
            assert p.l4_csum_ok and (not v4 or p.ip_csum_ok) and p.payload == b"req"
            masq_port = p.sport
            ret, out = ingress(d, frame(be, snat, 8080, masq_port, TCP, b"resp", flags=0x12))
            p = parse(out)
            assert ret == TC_ACT_OK and (p.src, p.dst, p.dport) == (be, client, sport)
            assert p.l4_csum_ok and (not v4 or p.ip_csum_ok)
            ret, out = egress(d, out)
            p = parse(out)
            assert ret == TC_ACT_OK
            assert (p.src, p.sport, p.dst, p.dport) == (vip, 80, client, sport)
            assert p.l4_csum_ok and (not v4 or p.ip_csum_ok) and p.payload == b"resp"
            after = d.stats()
            assert {k: after[k] - before[k] for k in ("dnat", "snat", "unsnat", "revnat")} \
                == {"dnat": 1, "snat": 1, "unsnat": 1, "revnat": 1}
    finally:
        d.cleanup()


@pytest.mark.parametrize("masq", [False, True], ids=["direct", "masquerade"])
@pytest.mark.parametrize("proto", [TCP, UDP], ids=["tcp", "udp"])
def test_an_ended_flows_entries_never_rewrite_the_next_flow_on_its_tuple(
        proto: int, masq: bool) -> None:
    """A client that reached a backend through a Service from port P later talks to
    the backend's own address from P. The old flow's reply-side entries (revnat, and
    snat/unsnat when masqueraded) have the new flow's tuple. While the old flow is
    live they stay its own (a reply, even a SYN-ACK, comes from the frontend; a
    closing flow's FIN-ACK too). Once it has ended (TCP: a FIN was seen and a SYN
    opens the new one; UDP: its backend left the Service), the new flow's packets
    pass untouched and the stale entries go (ct_reclaim)."""
    from controller.datapaths.node import NodeNet

    vip, be, be2, node_ip = "10.96.0.90", "10.244.0.91", "10.244.0.92", "10.0.0.1"
    syn, synack, ack, finack = 0x02, 0x12, 0x10, 0x11
    d = new_datapath()
    d.load()
    try:
        ip = ipaddress.ip_address
        proto_m = Protocol.TCP if proto == TCP else Protocol.UDP

        def program(backend: str) -> None:
            d.sync(State([entry(vip, 80, proto_m, [(backend, 8080)])]), None)
            assert d.node_maps is not None  # a sync reads the node's own: ours after it
            d.node_maps.write(NodeNet(addresses=(ip(node_ip),), nodeport=(ip(node_ip),),
                                      snat=(ip(node_ip),), cluster_cidrs=(),
                                      masquerade_all=masq, netns_cookie=0))
        program(be)
        sport = 40400

        def service_round_trip(flags_in: int, flags_out: int) -> None:
            """client -> vip, then the backend's answer back to the client."""
            ret, out = ingress(d, frame(CLIENT, vip, sport, 80, proto, flags=flags_in))
            ret, out = egress(d, out)
            p = parse(out)
            assert ret == TC_ACT_OK and (p.dst, p.dport) == (be, 8080)
            assert p.src == (node_ip if masq else CLIENT)
            ret, out = ingress(d, frame(be, p.src, 8080, p.sport, proto, flags=flags_out))
            ret, out = egress(d, out)
            p = parse(out)
            assert ret == TC_ACT_OK and (p.src, p.sport, p.dst, p.dport) == \
                (vip, 80, CLIENT, sport) and p.l4_csum_ok

        def direct(flags: int) -> tuple[str, int, str]:
            """The client's packet straight to the backend, as it leaves for it
            (source), and the backend's answer as it leaves for the client (source)."""
            ret, out = ingress(d, frame(CLIENT, be, sport, 8080, proto, flags=flags))
            ret, out = egress(d, out)
            assert ret == TC_ACT_OK
            p = parse(out)
            assert (p.dst, p.dport) == (be, 8080)
            ret, back = egress(d, frame(be, CLIENT, 8080, sport, proto, flags=flags | ack))
            q = parse(back)
            assert ret == TC_ACT_OK and (q.dst, q.dport) == (CLIENT, sport)
            return p.src, p.sport, q.src

        service_round_trip(syn, synack)
        before = d.stats()
        # the old flow is live: it keeps its entries (an answer from the backend
        # comes from the frontend); in a closing TCP flow, the FIN-ACK too
        if proto == TCP:
            service_round_trip(finack, finack)
        else:
            assert direct(0)[2] == vip
        assert d.stats()["ct_reclaim"] == before["ct_reclaim"]
        # the old flow ends
        if proto == UDP:
            program(be2)
        mid = d.stats()
        src, src_port, answer_src = direct(syn)
        assert (src, src_port, answer_src) == (CLIENT, sport, be)
        after = d.stats()
        assert after["ct_reclaim"] == before["ct_reclaim"] + 1
        assert (after["snat"], after["revnat"]) == (mid["snat"], mid["revnat"])
        # the entries are gone: the direct flow's later packets pass without a check
        assert direct(ack if proto == TCP else 0) == (CLIENT, sport, be)
        assert d.stats()["ct_reclaim"] == before["ct_reclaim"] + 1
    finally:
        d.cleanup()


def test_a_flow_never_follows_its_backend_id_to_the_next_owner() -> None:
    """Backend ids are indexes of the backends array and are reused. A flow bound to
    a released backend must find it gone (another generation), not the backend that
    now holds its id: it is balanced again over its own service."""
    from controller.datapaths.ebpf.loader import MapSizes
    from controller.datapaths.ebpf.maps import pack_backend

    d = new_datapath(sizes=MapSizes(backends=3))  # ids 1..3: every id is reused soon
    d.load()
    try:
        s1 = entry("10.96.0.70", 80, Protocol.TCP, [("10.244.0.71", 8080)])
        d.sync(State([s1]), None)
        ret, out = ingress(d, frame(CLIENT, "10.96.0.70", 40300, 80, TCP))
        assert parse(out).dst == "10.244.0.71"
        old = d.maps.backend_ids()[pack_backend(s1.backends[0], Protocol.TCP)]
        # the flow's backend leaves; two other backends come and take ids 2, 3, then
        # the released one
        s1b = entry("10.96.0.70", 80, Protocol.TCP, [("10.244.0.73", 8080)])
        s2 = entry("10.96.0.80", 80, Protocol.TCP, [("10.244.0.74", 8080), ("10.244.0.72", 8080)])
        d.sync(State([s1b]), None)
        d.sync(State([s1b, s2]), None)
        ids = d.maps.backend_ids()
        assert sorted(ids.values()) == [1, 2, 3]
        assert old in {ids[pack_backend(b, Protocol.TCP)] for b in s2.backends}
        before = d.stats()
        ret, out = ingress(d, frame(CLIENT, "10.96.0.70", 40300, 80, TCP, flags=0x10))
        p = parse(out)
        assert ret == TC_ACT_OK and (p.dst, p.dport) == ("10.244.0.73", 8080)
        assert p.ip_csum_ok and p.l4_csum_ok
        assert d.stats()["ct_stale"] == before["ct_stale"] + 1
        # The newest generation went to s2's backends. With them released, only
        # their tombstones hold it: a restarted controller still reads it back, so
        # its next backend gets a newer one than any flow may hold.
        d.sync(State([s1b]), None)
        newest = d.maps._be_ids.gen
        d2 = EbpfDatapath(d.cfg)
        try:
            d2.load()
            assert d2.sync(State([s1b]), None).ops == 0  # adopts: nothing to change
            assert d2.maps._be_ids.gen == newest > max(d.maps.backend_ids().values())
        finally:
            d2.cleanup()
    finally:
        d.cleanup()


@pytest.mark.parametrize("clock_hz", [None, 0], ids=["jiffies", "ns-clock"])
def test_established_flows_under_either_flow_clock(clock_hz: int | None) -> None:
    """The flow clock is jiffies when the kernel's tick rate is known (here it is:
    the config says so, and measuring agrees), else the nanosecond clock. Under
    both, a flow keeps its backend and a SYN after its FIN is a new flow."""
    from controller import kernel

    assert kernel.clock_hz() == kernel._measured_hz() != 0
    d = new_datapath(clock_hz=clock_hz)
    d.load()
    try:
        d.sync(State([entry("10.96.0.90", 80, Protocol.TCP,
                            [("10.244.0.91", 8080), ("10.244.0.92", 8080)])]), None)
        first = parse(ingress(d, frame(CLIENT, "10.96.0.90", 40400, 80, TCP))[1]).dst
        before = d.stats()
        for flags in (0x10, 0x18, 0x11):  # ACK, PSH|ACK, FIN|ACK
            assert parse(ingress(d, frame(CLIENT, "10.96.0.90", 40400, 80, TCP,
                                          flags=flags))[1]).dst == first
        assert d.stats()["ct_hit"] == before["ct_hit"] + 3
        # the port reused after FIN: a new flow, balanced again
        ingress(d, frame(CLIENT, "10.96.0.90", 40400, 80, TCP, flags=0x02))
        assert d.stats()["new_flow"] == before["new_flow"] + 1
    finally:
        d.cleanup()


def test_a_syn_flood_larger_than_conntrack_evicts_no_established_flow() -> None:
    """1,000,000 SYNs from spoofed sources (as a flood sends them: no handshake ever
    completes) beside 200 established flows that each send one packet, and get one
    reply, per 10,000 SYNs. conntrack holds 4,096 flows: under one table the flood
    would evict every established flow 244 times over. Half-open flows live in
    half_open (also 4,096) until their handshake completes, so not one established
    packet is lost: each keeps its backend and each reply its frontend."""
    import random

    from controller.datapaths.ebpf.loader import MapSizes
    from controller.kernel import TestRunner

    vip = "10.96.0.100"
    d = new_datapath(sizes=MapSizes(conntrack=4096, half_open=4096))
    d.load()
    try:
        d.sync(State([entry(vip, 80, Protocol.TCP, [(f"10.244.1.{i}", 8080)
                                                   for i in range(1, 9)])]), None)
        flows: list[tuple[str, int, str]] = []
        for i in range(200):
            cli, port = f"10.244.2.{i % 250 + 1}", 20000 + i
            be = parse(ingress(d, frame(cli, vip, port, 80, TCP))[1]).dst  # SYN
            egress(d, frame(be, cli, 8080, port, TCP, flags=0x12))          # SYN-ACK
            assert parse(ingress(d, frame(cli, vip, port, 80, TCP, flags=0x10))[1]).dst == be
            flows.append((cli, port, be))
        before = d.stats()
        assert before["ct_promote"] >= 200
        flood = TestRunner(d.prog_fds["ingress"], frame("10.250.0.1", vip, 1024, 80, TCP))
        rnd = random.Random(7)
        lost = 0
        for burst in range(100):
            for _ in range(10_000):
                flood.patch(26, rnd.randbytes(4))  # IPv4 source (14 + 12)
                flood.patch(34, rnd.randbytes(2))  # TCP source port (14 + 20)
                assert flood.run() == TC_ACT_OK
            for cli, port, be in flows:
                p = parse(ingress(d, frame(cli, vip, port, 80, TCP, flags=0x18))[1])
                r = parse(egress(d, frame(be, cli, 8080, port, TCP, flags=0x18))[1])
                lost += (p.dst, p.dport) != (be, 8080) or (r.src, r.sport) != (vip, 80)
        after = d.stats()
        print(f"1,000,000 SYNs: {lost} established packets lost; half-open flows "
              f"{after['ct_half_open'] - before['ct_half_open']}, conntrack hits "
              f"{after['ct_hit'] - before['ct_hit']}")
        assert after["ct_half_open"] - before["ct_half_open"] == 1_000_000
        assert lost == 0
        assert after["ct_hit"] - before["ct_hit"] == 200 * 100
    finally:
        d.cleanup()


def test_an_idle_flow_lives_as_long_as_kube_proxys_conntrack_keeps_it() -> None:
    """Established TCP 24 h (conntrack.tcpEstablishedTimeout), after a FIN 1 h
    (tcpCloseWaitTimeout), after a FIN each way 2 min (netfilter's TIME_WAIT), UDP
    60 s: read from each entry's last_seen, moved back in time in the map, not
    waited for. The backend's FIN is seen on its way back (egress)."""
    from controller import kernel
    from controller.datapaths.ebpf.layouts import Clock
    from controller.datapaths.ebpf.maps import BpfMap
    from controller.datapaths.ebpf.handover import _CT, _tuple

    vip = "10.96.0.110"
    d = new_datapath()
    d.load()
    try:
        assert d.bpf is not None
        d.sync(State([entry(vip, 80, Protocol.TCP, [("10.244.3.1", 8080), ("10.244.3.2", 8080)]),
                      entry(vip, 53, Protocol.UDP, [("10.244.3.1", 5353), ("10.244.3.2", 5353)])]),
               None)
        ctm = BpfMap(d.bpf["conntrack"], "conntrack")
        hz = kernel.clock_hz()

        def age_by(key: bytes, secs: int) -> None:
            seen, *rest = _CT.unpack(ctm.lookup(key) or b"")
            ctm.update([(key, _CT.pack(Clock.of(hz).now - secs * Clock.of(hz).per_sec,
                                       *rest))])

        cases = [  # (proto, client port, packets to set the state, the backend's, lifetime)
            (TCP, 40500, [0x02, 0x10], [], 86400),
            (TCP, 40501, [0x02, 0x10, 0x11], [], 3600),
            (TCP, 40503, [0x02, 0x10], [0x11], 3600),  # the backend closed first
            (TCP, 40504, [0x02, 0x10, 0x11], [0x11], 120),
            (UDP, 40502, [0], [], 60),
        ]
        for proto, port, flags, replies, life in cases:
            dport = 80 if proto == TCP else 53
            for fl in flags:
                out = parse(ingress(d, frame(CLIENT, vip, port, dport, proto, flags=fl))[1])
                be, bport = out.dst, out.dport
            for fl in replies:
                back = parse(egress(d, frame(be, CLIENT, bport, port, proto, flags=fl))[1])
                assert (back.src, back.sport) == (vip, dport)  # reverse-NATed
            key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port,
                         dport, proto)
            ack = 0x10 if proto == TCP else 0
            for secs, alive in ((life - 30, True), (life + 30, False)):
                age_by(key, secs)
                before = d.stats()
                parse(ingress(d, frame(CLIENT, vip, port, dport, proto, flags=ack))[1])
                after = d.stats()
                hit = after["ct_hit"] - before["ct_hit"]
                assert hit == (1 if alive else 0), (proto, port, life, secs)
                assert after["new_flow"] - before["new_flow"] == (0 if alive else 1)
            del be
    finally:
        d.cleanup()


def _v3_conntrack(d: EbpfDatapath) -> tuple[int, int, int]:
    """A map of the previous layout's conntrack type (as its kpr creates it): (fd,
    key size, value size)."""
    from controller import kernel

    assert d.bpf is not None
    h = d.bpf["conntrack"]
    return kernel.map_create(h.map_type, h.key_size, h.value_size, 1024, 0, "conntrack"), \
        h.key_size, h.value_size


def test_an_upgrade_finds_the_flows_the_old_programs_opened_after_the_copy() -> None:
    """During an upgrade the old layout's conntrack sits in ct_prev's import slot: a
    flow missing from conntrack (opened by the old programs after the controller's
    copy) is found there, converted, and keeps its backend from its first packet on
    the new programs; once the slot is emptied, such a flow is balanced anew."""
    import ctypes
    import os
    import time

    from controller import kernel
    from controller.datapaths.ebpf import layouts
    from controller.datapaths.ebpf.handover import _CT, _tuple
    from controller.datapaths.ebpf.maps import BpfMap

    vip, bes = "10.96.0.120", [("10.244.4.1", 8080), ("10.244.4.2", 8080)]
    d = new_datapath()
    d.load()
    fd = -1
    try:
        assert d.bpf is not None and d.maps is not None
        d.sync(State([entry(vip, 80, Protocol.TCP, bes)]), None)
        f = Frontend(ipaddress.ip_address(vip), 80, Protocol.TCP)
        bind = {a: d.maps.binding(f, Backend(ipaddress.ip_address(a), p)) for a, p in bes}
        bem = BpfMap(d.bpf["backends"], "backends")
        for b in bind.values():  # as Upgrade.convert carries them: generation 1
            assert b is not None
            raw = bytearray(bem.lookup(struct.pack("=I", b[1])) or b"")
            struct.pack_into("=I", raw, 20, 1)
            bem.update([(struct.pack("=I", b[1]), bytes(raw))])
        fd, ks, vs = _v3_conntrack(d)
        ten_s_ago = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - 10 * 10**9
        flows = {40600: "10.244.4.1", 40601: "10.244.4.2", 40602: "10.244.4.2",
                 40603: "10.244.4.1"}
        for port, be in flows.items():
            sid, bid, _ = bind[be]  # type: ignore[misc]
            key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port, 80, TCP)
            val = _CT.pack(ten_s_ago, bid, sid, bytes(16), 0, 0, 0)
            assert kernel.map_update_elem(fd, ctypes.create_string_buffer(key, ks),
                                          ctypes.create_string_buffer(val, vs)) == 0
        layouts._slot(d.bpf.maps, layouts._PREV_IMPORT, fd)
        before = d.stats()
        for port in (40600, 40601, 40602, 40603):  # mid-connection: an ACK, no SYN
            ret, out = ingress(d, frame(CLIENT, vip, port, 80, TCP, b"data", flags=0x18))
            p = parse(out)
            assert ret == TC_ACT_OK and (p.dst, p.dport) == (flows[port], 8080), port
            assert p.ip_csum_ok and p.l4_csum_ok
        after = d.stats()
        assert after["ct_import"] - before["ct_import"] == 4
        assert after["new_flow"] == before["new_flow"]
        ctm = BpfMap(d.bpf["conntrack"], "conntrack")
        key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), 40600, 80, TCP)
        assert _CT.unpack(ctm.lookup(key) or b"")[6] == 1  # the carried generation
        # converted by age into the new clock, and v3's CLOSING (FIN or RST alike, 10 s
        # there) as CLOSING|RST: 5 s after it the flow is still used, 30 s after not
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sid, bid, _ = bind["10.244.4.1"]  # type: ignore[misc]
        for port, age, kept in ((40604, 5, True), (40605, 30, False)):
            key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port, 80, TCP)
            val = _CT.pack(now_ns - age * 10**9, bid, sid, bytes(16), 0, 0x1, 0)
            kernel.map_update_elem(fd, ctypes.create_string_buffer(key, ks),
                                   ctypes.create_string_buffer(val, vs))
            before = d.stats()
            ingress(d, frame(CLIENT, vip, port, 80, TCP, flags=0x10))
            after = d.stats()
            assert after["ct_import"] - before["ct_import"] == 1, port
            assert after["new_flow"] - before["new_flow"] == (0 if kept else 1), (port, age)
        layouts._slot(d.bpf.maps, layouts._PREV_IMPORT, None)
        before = d.stats()
        for port in range(40610, 40618):
            key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port, 80, TCP)
            val = _CT.pack(ten_s_ago, bind["10.244.4.1"][1], bind["10.244.4.1"][0],  # type: ignore[index]
                           bytes(16), 0, 0, 0)
            kernel.map_update_elem(fd, ctypes.create_string_buffer(key, ks),
                                   ctypes.create_string_buffer(val, vs))
            ingress(d, frame(CLIENT, vip, port, 80, TCP, flags=0x18))
        after = d.stats()
        assert after["ct_import"] == before["ct_import"]
        assert after["new_flow"] - before["new_flow"] == 8
    finally:
        if fd >= 0:
            os.close(fd)
        d.cleanup()


def test_a_rollback_export_carries_the_flows_opened_after_it() -> None:
    """A stop (SIGTERM before a rollback: close() with rollback_export) leaves the
    previous layout's conntrack pinned and in ct_prev's export slot: a flow the
    programs open after it (while the older kpr starts) is in that table too, in
    that layout's format, and a SYN no longer waits in half_open (the older layout
    has none)."""
    import os
    import time

    from controller.datapaths.ebpf import layouts
    from controller.datapaths.ebpf.handover import _CT, _tuple

    vip, bes = "10.96.0.121", [("10.244.4.11", 8080), ("10.244.4.12", 8080)]
    d = new_datapath(rollback_export=True)
    d.load()
    try:
        assert d.bpf is not None and d.maps is not None
        d.sync(State([entry(vip, 80, Protocol.TCP, bes)]), None)
        ingress(d, frame(CLIENT, vip, 40700, 80, TCP, flags=0x02))  # before: copied
        ingress(d, frame(CLIENT, vip, 40700, 80, TCP, flags=0x10))
        d.close()  # the export, and KPR_STATE_F_COEXIST
        before = d.stats()
        chosen = {}
        for port in (40701, 40702, 40703):
            p = parse(ingress(d, frame(CLIENT, vip, port, 80, TCP, flags=0x02))[1])
            chosen[port] = p.dst
        after = d.stats()
        assert after["ct_export"] - before["ct_export"] == 3
        assert after["ct_half_open"] == before["ct_half_open"]
        path = d.cfg.pin_dir / f"conntrack_v{layouts.PREVIOUS}"
        v3 = layouts._open(path, "conntrack_v3")
        try:
            now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            for port in (40700, 40701, 40702, 40703):
                key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port,
                             80, TCP)
                raw = v3.lookup(key)
                assert raw is not None, port
                seen, bid, _, _, _, flags, pad = _CT.unpack(raw)
                be = kernel_backend(d, bid)
                if port in chosen:
                    assert be == chosen[port], port
                assert pad == 0 and flags == 0 and 0 <= now_ns - seen < 30 * 10**9
        finally:
            os.close(v3.fd)
    finally:
        d.cleanup()


def kernel_backend(d: EbpfDatapath, bid: int) -> str:
    """The address of backend id ``bid`` in the backends array."""
    from controller.datapaths.ebpf.maps import BpfMap

    assert d.bpf is not None
    raw = BpfMap(d.bpf["backends"], "backends").lookup(struct.pack("=I", bid))
    assert raw is not None
    return str(ipaddress.ip_address(raw[12:16]))


def test_a_syn_skips_half_open_while_another_build_may_see_its_reply() -> None:
    """While start() attaches (or after a stop), another build's programs may handle
    a flow's other packets, and builds before half_open do not read it: with
    KPR_STATE_F_COEXIST a SYN's entries go in conntrack and the main reply-side maps,
    and the reply is reverse-NATed from there; without it, in half_open."""
    from controller.datapaths.ebpf import loader
    from controller.datapaths.ebpf.datapath import STATE_F_COEXIST

    vip, be = "10.96.0.122", "10.244.4.21"
    d = new_datapath()
    d.load()
    try:
        assert d.bpf is not None
        d.sync(State([entry(vip, 80, Protocol.TCP, [(be, 8080)])]), None)
        for port, coexist in ((40800, True), (40801, False)):
            loader.set_state(d.bpf.maps, STATE_F_COEXIST if coexist else 0)
            before = d.stats()
            p = parse(ingress(d, frame(CLIENT, vip, port, 80, TCP, flags=0x02))[1])
            assert (p.dst, p.dport) == (be, 8080)
            r = parse(egress(d, frame(be, CLIENT, 8080, port, TCP, flags=0x12))[1])
            assert (r.src, r.sport) == (vip, 80)  # the SYN-ACK, either way
            after = d.stats()
            assert after["ct_half_open"] - before["ct_half_open"] == (0 if coexist else 1)
            ct = d.bpf["conntrack"]
            from controller.datapaths.ebpf.handover import _tuple
            from controller.datapaths.ebpf.maps import BpfMap
            key = _tuple(ipaddress.ip_address(CLIENT), ipaddress.ip_address(vip), port, 80, TCP)
            assert (BpfMap(ct, "conntrack").lookup(key) is not None) == coexist
    finally:
        d.cleanup()
