"""The compile step, in a process of its own: ``python -m controller.datapaths.ebpf.build``.

bcc compiles bpf/ with LLVM, creates or reuses the pinned maps (BPF_TABLE_PINNED)
and loads every program; each program is pinned in the staging directory the
parent named, for it to open by path. Then this process exits, and bcc, LLVM and
their memory go with it (see loader's module docstring). Errors go to stderr, which
the parent logs and reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from controller import kernel
from controller.datapaths.ebpf import loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.datapaths.ebpf.build")
    p.add_argument("--pin-dir", required=True, type=Path)
    p.add_argument("--stage", required=True, type=Path)
    p.add_argument("--sizes", required=True, help="JSON: MapSizes fields")
    p.add_argument("--programs", default="[]",
                   help="JSON: [[socket program name, attach type], ...]")
    p.add_argument("--hz", type=int, default=0, help="the kernel's tick rate (0: unknown)")
    p.add_argument("--timeouts", default="{}", help="JSON: Timeouts fields")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    from bcc import BPF  # this process's reason to exist

    bpf = loader.compile_program(args.pin_dir, loader.MapSizes(**json.loads(args.sizes)),
                                 hz=args.hz,
                                 timeouts=loader.Timeouts(**json.loads(args.timeouts)))
    for name in loader.STAGED_MAPS:  # unpinned maps: the parent opens them from here
        kernel.obj_pin(bpf[name].map_fd, args.stage / name)
    for name in loader.TC_PROGRAMS:
        kernel.obj_pin(bpf.load_func(f"kpr_{name}", BPF.SCHED_CLS).fd, args.stage / name)
    for name, attach_type in json.loads(args.programs):
        fn = bpf.load_func(f"kpr_sock_{name}", BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
        kernel.obj_pin(fn.fd, args.stage / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
