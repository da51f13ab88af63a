"""Attaching the socket programs (bpf/kpr_sock.h) to a cgroup v2, as pinned links.

A bpf_link pinned in the instance's pin directory keeps the programs attached
while kpr is down or restarting, like the tc filters. A restarted kpr swaps its
newly loaded programs into the existing links (BPF_LINK_UPDATE, atomic), so host
sockets are never left without translation. Cleanup unpins the links; a link whose
last reference is gone detaches itself.

Links attach in "multi" mode: several kpr instances (one per simulated node, in
tests) and other users' programs coexist on one cgroup.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from controller import kernel

log = logging.getLogger(__name__)

# (program suffix, enum bpf_attach_type value from include/uapi/linux/bpf.h)
PROGRAMS: tuple[tuple[str, int], ...] = (
    ("connect4", 10),      # BPF_CGROUP_INET4_CONNECT
    ("sendmsg4", 14),      # BPF_CGROUP_UDP4_SENDMSG
    ("recvmsg4", 19),      # BPF_CGROUP_UDP4_RECVMSG
    ("getpeername4", 29),  # BPF_CGROUP_INET4_GETPEERNAME
    ("connect6", 11),      # BPF_CGROUP_INET6_CONNECT
    ("sendmsg6", 15),      # BPF_CGROUP_UDP6_SENDMSG
    ("recvmsg6", 20),      # BPF_CGROUP_UDP6_RECVMSG
    ("getpeername6", 30),  # BPF_CGROUP_INET6_GETPEERNAME
)


def link_path(pin_dir: Path, name: str) -> Path:
    return pin_dir / f"link_sock_{name}"


def attach(pin_dir: Path, cgroup: Path, prog_fds: dict[str, int]) -> int:
    """Attach (or swap in) every socket program; returns how many links were new."""
    created = 0
    cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, attach_type in PROGRAMS:
            path = link_path(pin_dir, name)
            if path.exists():
                fd = kernel.obj_get(path)
                try:
                    kernel.link_update(fd, prog_fds[name])
                finally:
                    os.close(fd)
                continue
            fd = kernel.link_create(prog_fds[name], cg, attach_type)
            try:
                kernel.obj_pin(fd, path)
            finally:
                os.close(fd)
            created += 1
    finally:
        os.close(cg)
    log.info("socket programs attached to cgroup %s (%d new links)", cgroup, created)
    return created


def attached(pin_dir: Path) -> list[str]:
    """The socket programs with a pinned link."""
    return [name for name, _ in PROGRAMS if link_path(pin_dir, name).exists()]
