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
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from controller import __version__

log = logging.getLogger("kpr")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _ebpf_config(cfg: Any, netns: str | None = None) -> Any:
    from controller.datapaths.ebpf.datapath import EbpfConfig
    from controller.datapaths.ebpf.loader import MapSizes, Timeouts

    ms = cfg.map_sizes
    sizes = MapSizes(**{k: v for k, v in (
        ("services", ms.services), ("slots", ms.slots),
        ("backends", ms.backends), ("conntrack", ms.conntrack)) if v})
    sizes = dataclasses.replace(sizes, maglev_size=cfg.maglev_table_size)
    from controller import kernel

    cgroup = None
    if cfg.cgroup_root == "auto":
        cgroup = kernel.cgroup2_mount()
        if cgroup is None:
            log.warning("no cgroup v2 mount found: host traffic to Services is not "
                        "balanced (set kpr.cgroupRoot)")
    elif cfg.cgroup_root not in ("", "none"):
        cgroup = Path(cfg.cgroup_root)
    return EbpfConfig(interfaces=list(cfg.interfaces), instance=cfg.instance,
                      pin_root=Path(cfg.bpffs_root), sizes=sizes, netns=netns,
                      nodeport_addresses=tuple(cfg.nodeport_addresses),
                      cluster_cidrs=tuple(cfg.cluster_cidrs),
                      masquerade_all=cfg.masquerade_all,
                      masquerade_address=cfg.masquerade_address,
                      lb_algorithm=cfg.lb_algorithm, cgroup=cgroup,
                      rollback_export=True, takeover=True,
                      classic_rules=_classic_installed(netns),
                      timeouts=Timeouts(
                          tcp_established=max(1, round(cfg.conntrack_tcp_established)),
                          tcp_close_wait=max(1, round(cfg.conntrack_tcp_close_wait))))


def _classic_installed(netns: str | None) -> bool:
    """Whether any classic datapath's rules are in place (a switch to eBPF)."""
    from controller.datapaths.iptables.datapath import installed as ipt
    from controller.datapaths.ipvs.datapath import installed as ipvs
    from controller.datapaths.nftables.datapath import installed as nft

    return nft(netns) or ipt(netns) or ipvs(netns)


def _load_config(args: argparse.Namespace) -> Any:
    from controller import config

    raw = {k: getattr(args, k, None) for k in (
        "mode", "source", "kubeconfig", "master", "hostname_override", "cluster_cidrs",
        "nodeport_addresses", "metrics_bind_address", "healthz_bind_address", "sync_period",
        "min_sync_period", "config_sync_period", "full_sync_period", "interfaces",
        "instance", "bpffs_root", "poll_interval", "lb_algorithm", "maglev_table_size",
        "masquerade_address", "cgroup_root", "iptables_backend", "ipvs_scheduler",
        "conntrack_tcp_established", "conntrack_tcp_close_wait")}
    raw["cleanup_on_exit"] = True if args.cleanup_on_exit else None
    raw["masquerade_all"] = True if args.masquerade_all else None
    overrides = config.flag_overrides(**raw)
    if args.max_services or args.max_slots or args.max_backends or args.max_conntrack:
        overrides["map_sizes"] = config.MapSizesConfig(
            services=args.max_services or 0, slots=args.max_slots or 0,
            backends=args.max_backends or 0, conntrack=args.max_conntrack or 0)
    cfg, ignored = config.load(args.config, overrides)
    if ignored:
        log.warning("config: kube-proxy settings without effect in kpr, ignored: %s",
                    ", ".join(sorted(ignored)))
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    import socket

    from controller.config import ConfigError, split_bind
    from controller.datapaths.base import DatapathError
    from controller.kernel import KernelHeadersError
    from controller.metrics import Metrics, ProxyHealth, health_server, metrics_server
    from controller.objects import Node
    from controller.sync import BoundedFrequencyRunner, Proxier
    from controller.tracker import ChangeTracker
    from controller.translate import NodeInfo

    try:
        cfg = _load_config(args)
    except ConfigError as e:
        print(f"kpr run: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.cleanup:
        # kube-proxy --cleanup: remove everything any mode installed, then exit.
        return _cleanup_all(cfg)
    if cfg.mode not in IMPLEMENTED and cfg.mode != "auto":
        print(f"kpr run: mode {cfg.mode!r} is not available yet "
              f"({', '.join(IMPLEMENTED)} and auto are)", file=sys.stderr)
        return 2
    node_name = (cfg.hostname_override or socket.gethostname()).strip().lower()

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    node_info = NodeInfo(name=node_name, proxy_name=cfg.service_proxy_name)
    tracker = ChangeTracker(node_info)
    dp = _select_datapath(cfg)
    if dp is None:
        return 1
    try:
        dp.start()
    except (KernelHeadersError, DatapathError, OSError) as e:
        log.error("cannot start the %s datapath: %s", dp.name, e)
        return 1
    hooks = _hold_tc_hooks(cfg, dp)
    health = ProxyHealth(timeout=2 * cfg.sync_period)
    metrics = Metrics(tracker, dp, health)
    servers = []
    try:
        if cfg.metrics_bind_address:
            servers.append(metrics_server(split_bind(cfg.metrics_bind_address), metrics))
        if cfg.healthz_bind_address:
            servers.append(health_server(split_bind(cfg.healthz_bind_address), health,
                                         metrics))
    except OSError as e:
        log.error("cannot listen for metrics/health: %s", e)
        dp.close()
        return 1
    from controller.healthcheck import HealthCheckServers

    hc = HealthCheckServers(proxy_healthy=lambda: health.healthy()[0],
                            on_error=lambda port, e: metrics.hc_errors.inc())
    switched = threading.Event()

    def after_first_sync(_diff: Any, _state: Any) -> None:
        # A datapath switch: the new datapath is programmed before the old one is
        # removed, so new connections never meet an empty node. The two coexist
        # meanwhile without conflict: whichever translates first (tc ingress runs
        # before netfilter), the other sees a backend address and leaves it.
        if not switched.is_set():
            switched.set()
            _remove_other_datapaths(cfg, dp)
            after = getattr(dp, "after_switch", None)
            if after is not None:
                after()

    proxier = Proxier(dp, tracker, full_sync_interval=cfg.full_sync_period, observer=metrics,
                      listeners=[hc.update, after_first_sync])
    runner = BoundedFrequencyRunner(proxier.sync, cfg.min_sync_period, cfg.sync_period,
                                    retry_interval=1.0)

    def on_change() -> None:
        metrics.queued()
        runner.request()

    def on_node(node: Node | None) -> None:
        zone = node.zone if node else ""
        if tracker.set_node(NodeInfo(name=node_name, proxy_name=cfg.service_proxy_name,
                                     zone=zone)):
            on_change()
        health.set_node_eligible(node is None or not node.deleting)

    source: Any
    if cfg.source == "kube":
        from controller.sources.kube import KubeSource, api_client

        try:
            client = api_client(cfg.kubeconfig, cfg.master)
        except Exception as e:  # noqa: BLE001 - the client raises several kinds
            log.error("cannot configure the Kubernetes client: %s", e)
            dp.close()
            return 1
        source = KubeSource(client, tracker, node_name, on_change=on_change, on_node=on_node,
                            observer=metrics, resync_period=cfg.config_sync_period)
        source.start(stop)
        desc = f"kube ({client.configuration.host})"
        while not stop.is_set() and not source.wait_synced(stop, timeout=10):
            log.warning("waiting for the first list of Services, EndpointSlices and Node "
                        "from %s", client.configuration.host)
        if not stop.is_set():
            source.post_event("Starting", f"Starting kpr (datapath {dp.name}).")
    else:
        from controller.sources.file import FileSource, file_source_path

        path = file_source_path(cfg.source)
        source = FileSource(path, tracker, interval=cfg.poll_interval, on_change=on_change)
        desc = str(path)
        while not source.synced.is_set() and not stop.is_set():
            source.poll()
            if not source.synced.is_set():
                log.warning("waiting for %s to become readable before the first sync", path)
                stop.wait(cfg.poll_interval)
        threading.Thread(target=source.run, args=(stop,), name="kpr-source",
                         daemon=True).start()
    log.info("kpr %s running: node %s, datapath %s, interfaces %s, source %s", __version__,
             node_name, dp.name, ",".join(cfg.interfaces), desc)
    try:
        runner.loop(stop)
    finally:
        if cfg.source == "kube":
            source.interrupt()
        for srv in servers:
            srv.close()
        hc.close()
        if hooks is not None:
            hooks.stop()
        if cfg.cleanup_on_exit:
            dp.cleanup()
            if hooks is not None:
                from controller.datapaths.ebpf import tc

                tc.detach_all(prefix=f"{tc.NAME_PREFIX}{cfg.instance}/", keep_qdisc=False)
            log.info("removed programs, filters and maps (cleanupOnExit)")
        else:
            dp.close()
            log.info("stopped; programs, filters and pinned maps stay in place "
                     "(forwarding continues); 'kpr cleanup' removes them")
    return 0


IMPLEMENTED = ("ebpf", "nftables", "ipvs", "iptables")
"""Datapaths this build has, in ``auto``'s order of preference."""
AUTO_ORDER = ("ebpf", "nftables", "ipvs", "iptables")
"""``datapath: auto`` probes in this order (DESIGN.md)."""


def _make_datapath(cfg: Any, mode: str) -> Any:
    if mode == "ebpf":
        from controller.datapaths.ebpf.datapath import EbpfDatapath

        return EbpfDatapath(_ebpf_config(cfg))
    if mode == "nftables":
        from controller.datapaths.nftables.datapath import NftablesConfig, NftablesDatapath

        return NftablesDatapath(NftablesConfig(
            nodeport_addresses=tuple(cfg.nodeport_addresses),
            cluster_cidrs=tuple(cfg.cluster_cidrs), masquerade_all=cfg.masquerade_all,
            masquerade_address=cfg.masquerade_address))
    if mode == "ipvs":
        from controller.datapaths.ipvs.datapath import IpvsConfig, IpvsDatapath

        return IpvsDatapath(IpvsConfig(
            scheduler=cfg.ipvs_scheduler, nodeport_addresses=tuple(cfg.nodeport_addresses),
            cluster_cidrs=tuple(cfg.cluster_cidrs), masquerade_all=cfg.masquerade_all,
            masquerade_address=cfg.masquerade_address))
    if mode == "iptables":
        from controller.datapaths.iptables.datapath import IptablesConfig, IptablesDatapath

        return IptablesDatapath(IptablesConfig(
            backend=cfg.iptables_backend,
            nodeport_addresses=tuple(cfg.nodeport_addresses),
            cluster_cidrs=tuple(cfg.cluster_cidrs), masquerade_all=cfg.masquerade_all,
            masquerade_address=cfg.masquerade_address))
    raise ValueError(f"datapath {mode!r} is not implemented")


def _select_datapath(cfg: Any) -> Any:
    """The configured datapath, or for ``auto`` the first whose probe passes (each
    rejection logged with its reason). None when nothing can run."""
    if cfg.mode != "auto":
        dp = _make_datapath(cfg, cfg.mode)
        probe = dp.probe()
        if not probe.ok:
            log.error("the %s datapath cannot run here: %s", cfg.mode, probe.reason)
            return None
        return dp
    for mode in AUTO_ORDER:
        if mode not in IMPLEMENTED:
            log.info("mode auto: %s is not available in this build", mode)
            continue
        dp = _make_datapath(cfg, mode)
        probe = dp.probe()
        if probe.ok:
            log.info("mode auto: chose %s (%s)", mode, probe.reason)
            return dp
        log.warning("mode auto: %s rejected: %s", mode, probe.reason)
    log.error("mode auto: no datapath can run here")
    return None


def _hold_tc_hooks(cfg: Any, dp: Any) -> Any:
    """A classic mode keeps an empty clsact qdisc on the links the eBPF programs
    would attach to, created as each link appears: a later switch to eBPF then
    only adds filters, where grafting the qdisc under traffic would drop what the
    link sends for a moment (tc.py's module docstring). None for eBPF (its
    attacher does this) or when tc is unusable here (logged; a switch to eBPF
    still works, at the cost of that moment)."""
    if dp.name == "ebpf" or not cfg.interfaces:
        return None
    from controller.datapaths.ebpf import tc

    hooks = tc.TcAttacher(list(cfg.interfaces), None, None, cfg.instance)
    try:
        hooks.start()
    except Exception as e:  # noqa: BLE001 - pyroute2 raises its own and OSError
        log.warning("cannot hold clsact qdiscs on %s: %s", ",".join(cfg.interfaces), e)
        hooks.stop()
        return None
    return hooks


def _remove_other_datapaths(cfg: Any, dp: Any) -> None:
    """Switching datapath leaves nothing of the previous one: remove what every other
    datapath may have installed (in this network namespace and pin directory)."""
    keep = dp.name
    if keep != "ebpf":
        from controller.datapaths.ebpf.datapath import cleanup as ebpf_cleanup

        pin_dir = Path(cfg.bpffs_root) / cfg.instance
        if keep in ("nftables", "iptables", "ipvs") and pin_dir.exists():
            # netfilter translates with conntrack: it gets every BPF flow, with its
            # NAT, before the programs go (handover.py); IPVS never sees them (the
            # NAT happens at PREROUTING, before the Service address is local)
            from controller import kernel
            from controller.datapaths.ebpf import handover

            handover.to_netfilter(pin_dir, kernel.clock_hz(), handover.Lifetimes(
                tcp=max(1, round(cfg.conntrack_tcp_established)),
                close_wait=max(1, round(cfg.conntrack_tcp_close_wait))))
        if ebpf_cleanup(pin_dir):
            log.info("removed the eBPF datapath's filters and maps (switched to %s)", keep)
    if keep != "nftables":
        from controller.datapaths.nftables.datapath import cleanup as nft_cleanup

        if nft_cleanup():
            log.info("removed the nftables datapath's tables (switched to %s)", keep)
    if keep != "ipvs":
        from controller.datapaths.ipvs.datapath import cleanup as ipvs_cleanup

        if ipvs_cleanup():
            log.info("removed the IPVS datapath's services, link and table (switched to %s)",
                     keep)
    from controller.datapaths.iptables.datapath import BACKENDS
    from controller.datapaths.iptables.datapath import cleanup as ipt_cleanup

    # iptables: both back ends, or the one this datapath does not use
    others = tuple(b for b in BACKENDS if keep != "iptables" or b != dp.backend)
    if ipt_cleanup(None, others):
        log.info("removed the iptables datapath's chains from iptables-%s (switched to %s)",
                 "/".join(others), f"iptables-{dp.backend}" if keep == "iptables" else keep)


def _cleanup_all(cfg: Any) -> int:
    from controller.datapaths.ebpf.datapath import cleanup
    from controller.datapaths.iptables.datapath import cleanup as ipt_cleanup
    from controller.datapaths.nftables.datapath import cleanup as nft_cleanup

    from controller.datapaths.ipvs.datapath import cleanup as ipvs_cleanup

    removed = (cleanup(Path(cfg.bpffs_root), keep_qdisc=False) + nft_cleanup() + ipt_cleanup()
               + ipvs_cleanup())
    print(f"kpr cleanup: removed {removed} object(s)")
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
    dp: Any
    if sizes is not None:
        dp = EbpfDatapath(EbpfConfig(instance=args.instance, pin_root=Path(args.bpffs_root),
                                     sizes=sizes))
        dp.load()
    else:
        from controller.datapaths.nftables.datapath import NftablesConfig, NftablesDatapath

        from controller.datapaths.iptables.datapath import IptablesConfig, IptablesDatapath

        from controller.datapaths.ipvs.datapath import IpvsConfig, IpvsDatapath

        dp = NftablesDatapath(NftablesConfig())
        ipvs = IpvsDatapath(IpvsConfig())
        if dp.tables():
            data["datapath"] = "nftables"
        elif ipvs.tables():
            dp = ipvs
            data["datapath"] = "ipvs"
        else:
            for backend in ("nft", "legacy"):
                dp = IptablesDatapath(IptablesConfig(backend=backend))
                if dp.probe().ok and dp.chains():
                    data["datapath"] = "iptables"
                    data["iptables_backend"] = backend
                    break
            else:
                data["datapath"] = None
                return data
        data["pin_dir"] = ""
    for e in dp.dump().entries():
        data["services"].append({
            "name": e.name,
            "frontend": {"ip": str(e.frontend.ip), "port": e.frontend.port,
                         "protocol": e.frontend.protocol.name},
            "backends": [{"ip": str(b.ip), "port": b.port} for b in e.backends],
        })
    if sizes is not None:
        data["stats"] = dp.stats()
    return data


def cmd_status(args: argparse.Namespace) -> int:
    data = _status_data(args)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    if data["datapath"] is None:
        # exit 1, as a probe or a script needs it: kpr is not running here, or
        # looked elsewhere (a private /sys, another --bpffs-root or --instance)
        print(f"kpr status: nothing programmed in this network namespace: no pinned maps "
              f"in {data['pin_dir']}, no kpr nftables tables, no kpr IPVS services, no KPR "
              "iptables chains", file=sys.stderr)
        return 1
    if args.json:
        return 0
    if data["datapath"] == "nftables":
        print("datapath: nftables   tables: ip kpr, ip6 kpr")
    elif data["datapath"] == "ipvs":
        print("datapath: ipvs   link: kpr-ipvs0   table: ip kpr-ipvs, ip6 kpr-ipvs")
    elif data["datapath"] == "iptables":
        print(f"datapath: iptables ({data['iptables_backend']})   chains: KPR-* in the nat "
              "and filter tables")
    else:
        print(f"datapath: ebpf   instance: {data['instance']}   maps: {data['pin_dir']}")
        links: dict[str, list[str]] = {}
        for a in data["attachments"]:
            links.setdefault(a["interface"], []).append(a["direction"])
        print("attached: " + (", ".join(f"{k} ({'+'.join(v)})"
                                        for k, v in sorted(links.items()))
                              or "none in this network namespace"))

    def hostport(ip: str, port: int) -> str:  # IPv6 in brackets, as in URLs
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    rows = [("SERVICE", "FRONTEND", "BACKENDS")]
    for s in data["services"]:
        f = s["frontend"]
        bes = ", ".join(hostport(b["ip"], b["port"]) for b in s["backends"]) \
            or "(none: dropped)"
        rows.append((s["name"] or "-", f"{hostport(f['ip'], f['port'])}/{f['protocol']}", bes))
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
        removed = tc.detach_all(prefix=f"{tc.NAME_PREFIX}{args.instance}/", keep_qdisc=False)
        pin = root / args.instance
        if pin.exists():
            import shutil
            shutil.rmtree(pin)
            removed += 1
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # the last instance is gone
    else:
        removed = cleanup(root, keep_qdisc=False)
    from controller.datapaths.nftables.datapath import cleanup as nft_cleanup

    from controller.datapaths.iptables.datapath import cleanup as ipt_cleanup

    from controller.datapaths.ipvs.datapath import cleanup as ipvs_cleanup

    # the tables, chains and IPVS services of this network namespace
    removed += nft_cleanup() + ipt_cleanup() + ipvs_cleanup()
    print(f"kpr cleanup: removed {removed} object(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import run_demo

    return run_demo(requests=args.requests)


def cmd_bench(args: argparse.Namespace) -> int:
    from controller.bench import harness, report

    cfg = harness.QUICK if args.quick else harness.BenchConfig()
    over: dict[str, Any] = {}
    try:
        if args.scales:
            over["scales"] = tuple(int(x) for x in args.scales.split(","))
        if args.endpoints is not None:
            if not 1 <= args.endpoints <= 64:
                raise ValueError(f"--endpoints {args.endpoints}: 1 to 64")
            over["endpoints"] = args.endpoints
    except ValueError as e:
        print(f"kpr bench: {e}", file=sys.stderr)
        return 2
    if args.datapaths:
        over["datapaths"] = tuple(x.strip() for x in args.datapaths.split(",") if x.strip())
    for k in ("connections", "repeats"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.budget is not None:
        over["budget_s"] = args.budget
    if args.skip:
        pairs = []
        for item in args.skip.split(","):
            mode, _, at = item.strip().partition("@")
            if not mode or not at.isdigit():
                print(f"kpr bench: --skip {item!r}: want DATAPATH@SERVICES, e.g. "
                      "iptables@10000", file=sys.stderr)
                return 2
            pairs.append((mode, int(at)))
        over["skip"] = tuple(pairs)
    over["pin"] = args.pin
    over["out"] = Path(args.out)
    cfg = dataclasses.replace(cfg, **over)
    if os.geteuid() != 0:
        print("kpr bench: needs root (network namespaces, BPF, netfilter)", file=sys.stderr)
        return 2
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM, and SIGINT even when a background shell left it ignored: both end the
    # run through its finally blocks (nginx stopped, namespaces and pins removed).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    total = len(cfg.scales) * cfg.repeats * (1 + len(harness.available(cfg.datapaths)))
    with Progress(TextColumn("{task.description:<45}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as bar:
        task = bar.add_task("starting", total=total)
        first = [True]

        t0 = time.monotonic()

        def step(desc: str) -> None:
            if not first[0]:
                bar.advance(task)
            first[0] = False
            bar.update(task, description=desc)
            if not bar.console.is_terminal:  # a CI log: one line per step instead
                print(f"[{time.monotonic() - t0:6.0f} s] {desc}", flush=True)
        try:
            r = harness.run(cfg, step)
        except RuntimeError as e:
            print(f"kpr bench: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            print(f"kpr bench: stopped ({e or 'SIGINT'}); cleaned up, nothing written",
                  file=sys.stderr)
            return 130
        bar.update(task, completed=total, description="done")
    summary = report.write(r, cfg.out, Path(args.json) if args.json else None)
    report.print_table(summary)
    for t, v, ok in report.ebpf_targets(summary):
        print(f"  eBPF target: {t}: {v}" + ("" if ok is None else (" ✓" if ok else " ✗")))
    errors = [x for x in r.results if "error" in x]
    for x in r.results:
        if "skipped" in x:
            print(f"kpr bench: {x['datapath']} at {x['services']:,}: {x['skipped']}")
    for x in errors:
        print(f"kpr bench: {x['datapath']} at {x['services']} failed: "
              f"{x['error'].splitlines()[-1] if x['error'] else '?'}", file=sys.stderr)
    print(f"wrote {cfg.out / 'benchmarks.md'} and the plots beside it")
    return 1 if errors else 0


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

    r = sub.add_parser("run", help="program the node's Services and keep them in sync",
                       description="Flags override the --config file, which overrides the "
                       "defaults. Durations are Go-style (30s, 15m) or seconds.")
    r.add_argument("--config", help="a KubeProxyConfiguration YAML file")
    r.add_argument("--cleanup", action="store_true",
                   help="remove everything kpr installed, then exit (as kube-proxy --cleanup)")
    r.add_argument("--source", help="kube (default: the API server) or file:PATH")
    r.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    r.add_argument("--master", help="API server URL (overrides the kubeconfig's)")
    r.add_argument("--proxy-mode", "--datapath", dest="mode",
                   help="ebpf (default), nftables, ipvs, iptables or auto")
    r.add_argument("--ipvs-scheduler", help="for --proxy-mode ipvs: rr (default), wrr, lc, "
                   "wlc, sh, mh, sed, nq, ...")
    r.add_argument("--conntrack-tcp-timeout-established", dest="conntrack_tcp_established",
                   help="idle TCP flow lifetime in the eBPF flow table (default 24h)")
    r.add_argument("--conntrack-tcp-timeout-close-wait", dest="conntrack_tcp_close_wait",
                   help="TCP flow lifetime after the client's FIN (default 1h)")
    r.add_argument("--iptables-backend", help="for --proxy-mode iptables: nft, legacy or "
                   "auto (default: what the iptables command is)")
    r.add_argument("--interfaces",
                   help="comma-separated link names and globs to attach to, e.g. 'eth0,veth*'")
    r.add_argument("--instance", help="instance name: pin directory and filter names")
    r.add_argument("--bpffs-root", help="parent directory of the instances' pinned maps")
    r.add_argument("--hostname-override", help="this node's name (default: the host name)")
    r.add_argument("--cluster-cidr", dest="cluster_cidrs", help="pod CIDRs, comma-separated")
    r.add_argument("--nodeport-addresses", help="CIDRs or 'primary' for node ports")
    r.add_argument("--metrics-bind-address", help="host:port for /metrics "
                   "(default 127.0.0.1:10249; '' disables)")
    r.add_argument("--healthz-bind-address", help="host:port for /healthz and /livez "
                   "(default 0.0.0.0:10256; '' disables)")
    r.add_argument("--min-sync-period", metavar="DURATION")
    r.add_argument("--sync-period", metavar="DURATION")
    r.add_argument("--config-sync-period", metavar="DURATION",
                   help="how often the kube source relists (default 15m)")
    r.add_argument("--full-sync-period", metavar="DURATION",
                   help="re-read and repair the kernel maps at least this often")
    r.add_argument("--poll-interval", metavar="DURATION",
                   help="how often a file source checks for changes")
    r.add_argument("--masquerade-all", action="store_true")
    r.add_argument("--lb-algorithm", help="random or maglev (default for Services without "
                   "the kpr.dev/lb-algorithm annotation)")
    r.add_argument("--maglev-table-size", help="entries per Maglev table (a prime)")
    r.add_argument("--cgroup-root", help="cgroup v2 directory for the socket programs "
                   "(auto: the cgroup v2 mount; none: host traffic not balanced)")
    r.add_argument("--masquerade-address", help="node addresses masqueraded traffic leaves "
                   "with, one per family, comma-separated (default: each family's default "
                   "route source)")
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

    b = sub.add_parser("bench", help="every datapath side by side: control and data plane",
                       description="Generates N Services, programs them through each "
                       "available datapath in turn, measures programming and change times "
                       "and new-connection latency against the direct-to-backend floor; "
                       "writes JSON, PNG plots and benchmarks.md (root).")
    b.add_argument("--quick", action="store_true",
                   help="100 and 1,000 Services, 2,000 connections, one round (< 3 min)")
    b.add_argument("--scales", help="Service counts, comma-separated "
                   "(default 100,1000,10000,50000)")
    b.add_argument("--endpoints", type=int, help="endpoints per Service (2-10, default 4)")
    b.add_argument("--datapaths", help="comma-separated (default: every one available; "
                   "ebpf, nftables, ipvs, iptables, iptables-legacy)")
    b.add_argument("--connections", type=int, help="new connections per target and round "
                   "(default 20,000)")
    b.add_argument("--repeats", type=int, help="interleaved rounds (default 3)")
    b.add_argument("--pin", action="store_true",
                   help="pin the client to CPU 0 and nginx to CPU 1 (default: unpinned)")
    b.add_argument("--budget", type=float, help="skip a datapath at a scale where its full "
                   "sync would take longer than this many seconds (default 600)")
    b.add_argument("--skip", help="DATAPATH@SERVICES pairs not to measure, comma-separated "
                   "(e.g. iptables@10000)")
    b.add_argument("--out", default="docs", help="directory for benchmarks.md, plots, JSON")
    b.add_argument("--json", help="JSON results path (default OUT/benchmarks.json)")
    b.set_defaults(fn=cmd_bench)

    v = sub.add_parser("version")
    v.set_defaults(fn=lambda a: print(f"kpr {__version__}") or 0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
