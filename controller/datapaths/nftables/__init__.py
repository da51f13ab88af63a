"""The nftables datapath (kube-proxy's nftables mode, as kpr's own tables)."""
