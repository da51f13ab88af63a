"""The eBPF datapath: tc programs + pinned hash maps, programmed with batch ops."""
