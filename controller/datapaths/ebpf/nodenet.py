"""Writing the node's network facts (controller/datapaths/node.py) into the maps the
programs read: node_addrs, local_cidrs and node_config.

They are refreshed at start, on every full sync, and whenever the link watcher
sees an address change. Writing compares with what the maps hold, so an unchanged
node costs three reads.
"""

from __future__ import annotations

import struct

from controller.datapaths.ebpf import loader
from controller.datapaths.ebpf.maps import BpfMap, lpm_prefix, pack_addr
from controller.datapaths.node import NodeNet, discover, netns_cookie

__all__ = ["NodeMaps", "NodeNet", "discover", "netns_cookie"]

_C = loader.consts()
_LPM_KEY = struct.Struct("=I16s")
_CONFIG = struct.Struct("=16s16sIIQ")  # snat4, snat6, flags, pad, netns_cookie


class NodeMaps:
    """Writes a NodeNet into the maps, touching only what differs."""

    def __init__(self, bpf: loader.Loaded) -> None:
        self.addrs = BpfMap(bpf["node_addrs"], "node_addrs")
        self.cidrs = BpfMap(bpf["local_cidrs"], "local_cidrs", batch=False)
        self.config = BpfMap(bpf["node_config"], "node_config", batch=False)

    def write(self, net: NodeNet) -> int:
        ops = 0
        want = {pack_addr(ip): struct.pack("=I", _C["ADDR_F_NODEPORT"] if ip in net.nodeport
                                           else 0) for ip in net.addresses}
        have = dict(self.addrs.items())
        ops += self.addrs.update((k, v) for k, v in want.items() if have.get(k) != v)
        ops += self.addrs.delete(k for k in have if k not in want)
        want_c = {_LPM_KEY.pack(lpm_prefix(n), pack_addr(n.network_address))
                  for n in net.cluster_cidrs}
        have_c = set(self.cidrs.keys())
        ops += self.cidrs.update((k, b"\1") for k in want_c - have_c)
        ops += self.cidrs.delete(have_c - want_c)
        versions = {n.version for n in net.cluster_cidrs}
        flags = (_C["CFG_F_MASQ_ALL"] if net.masquerade_all else 0) | \
            (_C["CFG_F_DETECT_LOCAL"] if 4 in versions else 0) | \
            (_C["CFG_F_DETECT_LOCAL6"] if 6 in versions else 0)
        snat = {ip.version: pack_addr(ip) for ip in net.snat}
        cfg = _CONFIG.pack(snat.get(4, bytes(16)), snat.get(6, bytes(16)), flags, 0,
                           net.netns_cookie)
        if dict(self.config.items()).get(bytes(4)) != cfg:
            ops += self.config.update([(bytes(4), cfg)])
        return ops
