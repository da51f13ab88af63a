"""``kpr``: run | status | cleanup | demo | version.

``kpr run`` waits for its source's first complete read before the first sync (as
kube-proxy waits for its informers): a restarted kpr must never program an empty
state over the maps the running programs use. On SIGTERM/SIGINT it stops within a
second or two and leaves the programs, filters and pinned maps in place, so
forwarding continues while it is down or being upgraded; ``--cleanup-on-exit`` or
``kpr cleanup`` removes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from controller import __version__

log = logging.getLogger("kpr")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _ebpf_config(args: argparse.Namespace, interfaces: list[str]) -> Any:
    from controller.datapaths.ebpf.datapath import EbpfConfig
    from controller.datapaths.ebpf.loader import MapSizes

    sizes = MapSizes(**{k: v for k, v in (
        ("services", args.max_services), ("slots", args.max_slots),
        ("backends", args.max_backends), ("conntrack", args.max_conntrack)) if v})
    return EbpfConfig(interfaces=interfaces, instance=args.instance,
                      pin_root=Path(args.bpffs_root), sizes=sizes)


def cmd_run(args: argparse.Namespace) -> int:
    from controller.datapaths.base import DatapathError
    from controller.datapaths.ebpf.datapath import EbpfDatapath
    from controller.datapaths.ebpf.tc import parse_patterns
    from controller.kernel import KernelHeadersError
    from controller.sources.file import FileSource, file_source_path
    from controller.sync import BoundedFrequencyRunner, Proxier
    from controller.tracker import ChangeTracker
    from controller.translate import NodeInfo

    if args.datapath != "ebpf":
        print(f"kpr run: --datapath {args.datapath} is not available yet (ebpf is)",
              file=sys.stderr)
        return 2
    try:
        path = file_source_path(args.source)
        interfaces = parse_patterns(args.interfaces)
    except ValueError as e:
        print(f"kpr run: {e}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    tracker = ChangeTracker(NodeInfo(name=args.hostname_override))
    dp = EbpfDatapath(_ebpf_config(args, interfaces))
    try:
        dp.start()
    except (KernelHeadersError, DatapathError, OSError) as e:
        log.error("cannot start the eBPF datapath: %s", e)
        return 1
    proxier = Proxier(dp, tracker, full_sync_interval=args.full_sync_period)
    runner = BoundedFrequencyRunner(proxier.sync, args.min_sync_period, args.sync_period,
                                    retry_interval=1.0)
    source = FileSource(path, tracker, interval=args.poll_interval, on_change=runner.request)
    while not source.synced.is_set() and not stop.is_set():
        source.poll()
        if not source.synced.is_set():
            log.warning("waiting for %s to become readable before the first sync", path)
            stop.wait(args.poll_interval)
    threading.Thread(target=source.run, args=(stop,), name="kpr-source", daemon=True).start()
    log.info("kpr %s running: datapath ebpf, interfaces %s, source %s", __version__,
             ",".join(interfaces), path)
    try:
        runner.loop(stop)
    finally:
        if args.cleanup_on_exit:
            dp.cleanup()
            log.info("removed programs, filters and maps (--cleanup-on-exit)")
        else:
            dp.close()
            log.info("stopped; programs, filters and pinned maps stay in place "
                     "(forwarding continues); 'kpr cleanup' removes them")
    return 0


def _status_data(args: argparse.Namespace) -> dict[str, Any]:
    from controller.datapaths.ebpf import loader, tc
    from controller.datapaths.ebpf.datapath import EbpfConfig, EbpfDatapath

    pin_dir = Path(args.bpffs_root) / args.instance
    data: dict[str, Any] = {"datapath": "ebpf", "instance": args.instance,
                            "pin_dir": str(pin_dir), "services": [], "attachments": [],
                            "stats": {}}
    data["attachments"] = [{"interface": a.ifname, "direction": a.direction, "filter": a.name}
                           for a in tc.list_attachments()]
    sizes = loader.sizes_from_pins(pin_dir) if pin_dir.exists() else None
    if sizes is None:
        data["datapath"] = None
        return data
    dp = EbpfDatapath(EbpfConfig(instance=args.instance, pin_root=Path(args.bpffs_root),
                                 sizes=sizes))
    dp.load()
    for e in dp.dump().entries():
        data["services"].append({
            "name": e.name,
            "frontend": {"ip": str(e.frontend.ip), "port": e.frontend.port,
                         "protocol": e.frontend.protocol.name},
            "backends": [{"ip": str(b.ip), "port": b.port} for b in e.backends],
        })
    data["stats"] = dp.stats()
    return data


def cmd_status(args: argparse.Namespace) -> int:
    data = _status_data(args)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    if data["datapath"] is None:
        print(f"nothing programmed: no pinned maps in {data['pin_dir']}")
        return 0
    print(f"datapath: ebpf   instance: {data['instance']}   maps: {data['pin_dir']}")
    links: dict[str, list[str]] = {}
    for a in data["attachments"]:
        links.setdefault(a["interface"], []).append(a["direction"])
    print("attached: " + (", ".join(f"{k} ({'+'.join(v)})" for k, v in sorted(links.items()))
                          or "none in this network namespace"))
    rows = [("SERVICE", "FRONTEND", "BACKENDS")]
    for s in data["services"]:
        f = s["frontend"]
        bes = ", ".join(f"{b['ip']}:{b['port']}" for b in s["backends"]) or "(none: dropped)"
        rows.append((s["name"] or "-", f"{f['ip']}:{f['port']}/{f['protocol']}", bes))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print()
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")
    print()
    print("counters: " + (", ".join(f"{k}={v}" for k, v in data["stats"].items() if v)
                          or "none yet"))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from controller.datapaths.ebpf import tc
    from controller.datapaths.ebpf.datapath import cleanup

    root = Path(args.bpffs_root)
    if args.instance:
        removed = tc.detach_all(prefix=f"{tc.NAME_PREFIX}{args.instance}/")
        pin = root / args.instance
        if pin.exists():
            import shutil
            shutil.rmtree(pin)
            removed += 1
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # the last instance is gone
    else:
        removed = cleanup(root)
    print(f"kpr cleanup: removed {removed} object(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import run_demo

    return run_demo(requests=args.requests)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kpr", description="Kubernetes Service proxy with an "
                                "eBPF datapath.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--instance", default="default",
                        help="instance name: pin directory and filter names (default: default)")
        sp.add_argument("--bpffs-root", default="/sys/fs/bpf/kpr",
                        help="parent directory of the instances' pinned maps")

    r = sub.add_parser("run", help="program the node's Services and keep them in sync")
    common(r)
    r.add_argument("--source", required=True, help="file:PATH (a YAML/JSON file or directory)")
    r.add_argument("--datapath", "--proxy-mode", default="ebpf", dest="datapath",
                   help="ebpf (default)")
    r.add_argument("--interfaces", required=True,
                   help="comma-separated link names and globs to attach to, e.g. 'eth0,veth*'")
    r.add_argument("--hostname-override", default="", help="this node's name")
    r.add_argument("--min-sync-period", type=float, default=0.1, metavar="SECONDS")
    r.add_argument("--sync-period", type=float, default=30.0, metavar="SECONDS")
    r.add_argument("--full-sync-period", type=float, default=3600.0, metavar="SECONDS",
                   help="re-read and repair the kernel maps at least this often")
    r.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often the file source checks for changes")
    r.add_argument("--max-services", type=int, default=0)
    r.add_argument("--max-slots", type=int, default=0)
    r.add_argument("--max-backends", type=int, default=0)
    r.add_argument("--max-conntrack", type=int, default=0)
    r.add_argument("--cleanup-on-exit", action="store_true",
                   help="remove programs and maps on exit (forwarding stops)")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="show what the kernel holds")
    common(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    c = sub.add_parser("cleanup", help="remove everything kpr installed (safe to repeat)")
    c.add_argument("--instance", default="", help="only this instance (default: all)")
    c.add_argument("--bpffs-root", default="/sys/fs/bpf/kpr")
    c.set_defaults(fn=cmd_cleanup)

    d = sub.add_parser("demo", help="a node in network namespaces with real traffic")
    d.add_argument("--requests", type=int, default=60)
    d.set_defaults(fn=cmd_demo)

    v = sub.add_parser("version")
    v.set_defaults(fn=lambda a: print(f"kpr {__version__}") or 0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
