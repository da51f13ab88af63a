"""Configuration: a KubeProxyConfiguration-like YAML file plus the familiar flags.

Precedence is built-in defaults < ``--config`` file < flags given on the command line,
so a DaemonSet can ship one ConfigMap and override a field per node with a flag.

The file is kube-proxy's own format (``kubeproxy.config.k8s.io/v1alpha1``,
``KubeProxyConfiguration``), so an operator can start from the file they have:

* fields kpr implements are read with kube-proxy's meaning and defaults;
* kube-proxy fields kpr has no use for (``winkernel``, ``conntrack.maxPerCore``, ...) are
  accepted and listed in a warning, never silently;
* anything else is an error naming the field, as kube-proxy's strict decoding does;
* kpr's own settings live under a top-level ``kpr:`` block.

Every validation error names the field and the bad value
(``config.yaml: nodePortAddresses[1]: "10.0.0/8" is not a CIDR or "primary"``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from controller.model import IPNetwork

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
MODES = ("ebpf", "auto", "nftables", "iptables", "ipvs")

# kube-proxy fields accepted for compatibility but without effect in kpr.
IGNORED_KUBE_PROXY_FIELDS = frozenset({
    "bindAddress", "bindAddressHardFail", "detectLocal", "detectLocalMode",
    "enableProfiling", "featureGates", "healthzBindAddresses", "ipvs", "logging",
    "metricsBindAddresses", "nftables", "oomScoreAdj", "portRange", "showHiddenMetricsForVersion",
    "winkernel", "windowsRunAsService", "linux",
})


class ConfigError(ValueError):
    """An invalid setting, naming where it came from, the field and the value."""


@dataclass(frozen=True, slots=True)
class MapSizesConfig:
    """Capacities of the eBPF maps (0: the built-in default)."""

    services: int = 0
    """Frontends (service entries)."""
    slots: int = 0
    """Backend slots summed over all frontends."""
    backends: int = 0
    """Distinct backends."""
    conntrack: int = 0
    """Tracked flows (LRU)."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything ``kpr run`` needs, validated."""

    mode: str = "ebpf"
    """Datapath: ebpf, auto, nftables, iptables or ipvs (``mode``, ``--proxy-mode``)."""
    source: str = "kube"
    """Where Services come from: ``kube`` (the API server) or ``file:PATH``."""
    kubeconfig: str = ""
    """clientConnection.kubeconfig / --kubeconfig; "" with --source kube: in-cluster."""
    master: str = ""
    """--master: the API server URL, overriding the kubeconfig's."""
    hostname_override: str = ""
    """hostnameOverride: this node's name (default: the host name)."""
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    """clusterCIDR (comma-separated): pod ranges, for masquerade decisions."""
    nodeport_addresses: tuple[str, ...] = ()
    """nodePortAddresses: CIDRs and/or "primary"; empty: every node address."""
    metrics_bind_address: str = "127.0.0.1:10249"
    """metricsBindAddress: host:port of /metrics; "" disables it."""
    healthz_bind_address: str = "0.0.0.0:10256"
    """healthzBindAddress: host:port of /healthz and /livez; "" disables it."""
    sync_period: float = 30.0
    """syncPeriod: the longest time between syncs, seconds."""
    min_sync_period: float = 0.1
    """minSyncPeriod: the shortest time between syncs; changes in between coalesce.
    kube-proxy defaults to 1 s because an iptables-restore is costly; an eBPF
    partial sync is a few map writes, so kpr defaults lower."""
    config_sync_period: float = 900.0
    """configSyncPeriod: how often the kube source relists (0: never)."""
    full_sync_period: float = 3600.0
    """kpr.fullSyncPeriod: re-read and repair the datapath at least this often."""
    masquerade_all: bool = False
    """iptables.masqueradeAll: SNAT all service traffic."""
    interfaces: tuple[str, ...] = ("eth*", "ens*", "enp*", "veth*", "cali*", "cilium*",
                                   "lxc*", "flannel*", "cni*")
    """kpr.interfaces: link names and globs the eBPF programs attach to."""
    instance: str = "default"
    """kpr.instance: pin directory and filter names."""
    bpffs_root: str = "/sys/fs/bpf/kpr"
    """kpr.bpffsRoot: parent of the per-instance pin directory."""
    map_sizes: MapSizesConfig = field(default_factory=MapSizesConfig)
    """kpr.mapSizes."""
    service_proxy_name: str = ""
    """kpr.serviceProxyName: serve only Services with this service-proxy-name label."""
    poll_interval: float = 1.0
    """kpr.pollInterval: how often a file source looks for changes."""
    cleanup_on_exit: bool = False
    """kpr.cleanupOnExit: remove programs and maps when stopping (forwarding stops)."""
    lb_algorithm: str = "random"
    """kpr.loadBalancing / --lb-algorithm: random or maglev, for Services without the
    kpr.dev/lb-algorithm annotation."""
    maglev_table_size: int = 16381
    """kpr.maglevTableSize / --maglev-table-size: entries per Maglev table, a prime
    at least 100 x the largest backend count for even shares."""
    cgroup_root: str = "auto"
    """kpr.cgroupRoot / --cgroup-root: the cgroup v2 directory the socket programs
    attach to (host traffic to Services); "auto": the cgroup v2 mount; "none": off."""
    ipvs_scheduler: str = "rr"
    """ipvs.scheduler / --ipvs-scheduler: rr, wrr, lc, wlc, sh, mh, sed, nq, ... (kube-proxy's
    default rr); Services with the Maglev algorithm use mh."""
    iptables_backend: str = "auto"
    """kpr.iptablesBackend / --iptables-backend: nft, legacy, or auto (what the
    ``iptables`` command is); for the iptables datapath."""
    conntrack_tcp_established: float = 86400.0
    """conntrack.tcpEstablishedTimeout / --conntrack-tcp-timeout-established: how
    long an idle TCP flow keeps its backend in the eBPF datapath's flow table
    (kube-proxy's 24 h; kube-proxy writes it to the kernel's conntrack, which the
    classic datapaths use). 0 keeps the default."""
    conntrack_tcp_close_wait: float = 3600.0
    """conntrack.tcpCloseWaitTimeout / --conntrack-tcp-timeout-close-wait: how long
    a TCP flow keeps its backend after the client's FIN (kube-proxy's 1 h). 0 keeps
    the default."""
    masquerade_address: str = ""
    """kpr.masqueradeAddress / --masquerade-address: the node addresses masqueraded
    traffic leaves with, at most one per family, comma-separated; a family without
    one uses its default route's source (else its first global, non-link-local
    address)."""


# ----- parsing helpers ----------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, where: str) -> float:
    """A Go duration ("15m", "1h0m0s", "500ms") or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a duration like 30s or 15m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif isinstance(value, str) and value:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(value):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(value):
            raise ConfigError(f"{where}: must be a duration like 30s or 15m, got {value!r}")
    else:
        raise ConfigError(f"{where}: must be a duration like 30s or 15m, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: must not be negative, got {value!r}")
    return seconds


def _cidrs(value: Any, where: str) -> tuple[IPNetwork, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where}: must be a comma-separated list of CIDRs, got {value!r}")
    out = []
    for i, v in enumerate(items):
        v = v.strip() if isinstance(v, str) else v
        if v == "":
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except (ValueError, TypeError):
            raise ConfigError(f"{where}[{i}]: {v!r} is not a CIDR") from None
    return tuple(out)


def _nodeport_addresses(value: Any, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where}: must be a list of CIDRs or \"primary\", got {value!r}")
    out = []
    for i, v in enumerate(items):
        v = v.strip() if isinstance(v, str) else v
        if v == "":
            continue
        if v == "primary":
            out.append(v)
            continue
        try:
            out.append(str(ipaddress.ip_network(v, strict=False)))
        except (ValueError, TypeError):
            raise ConfigError(f"{where}[{i}]: {v!r} is not a CIDR or \"primary\"") from None
    return tuple(out)


def _bind(value: Any, where: str) -> str:
    """host:port, [v6]:port, or "" (disabled)."""
    if value in ("", None):
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be host:port, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep:
        # kube-proxy accepts a bare IP and adds the default port
        raise ConfigError(f"{where}: must be host:port (e.g. 0.0.0.0:10256), got {value!r}")
    try:
        ipaddress.ip_address(host.strip("[]"))
        if not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: must be IP:port with a port 0-65535, got {value!r}") from None
    return value


def split_bind(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _mode(value: Any, where: str) -> str:
    if value in ("", None):
        return "ebpf"
    if value not in MODES:
        raise ConfigError(f"{where}: must be one of {', '.join(MODES)}, got {value!r}")
    return str(value)


def _source(value: Any, where: str) -> str:
    if value == "kube" or (isinstance(value, str) and value.startswith("file:")
                           and len(value) > 5):
        return value
    raise ConfigError(f"{where}: must be 'kube' or 'file:PATH', got {value!r}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 26:
        raise ConfigError(f"{where}: must be an integer 0-{1 << 26}, got {value!r}")
    return value


def _interfaces(value: Any, where: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{where}: must be a list of link names or globs, got {value!r}")
    out = tuple(i.strip() for i in items if i.strip())
    if not out:
        raise ConfigError(f"{where}: must name at least one link, got {value!r}")
    return out


# field in the file -> (ProxyConfig attribute, parser)
_TOP: dict[str, tuple[str, Any]] = {
    "mode": ("mode", _mode),
    "hostnameOverride": ("hostname_override", _str),
    "clusterCIDR": ("cluster_cidrs", _cidrs),
    "nodePortAddresses": ("nodeport_addresses", _nodeport_addresses),
    "metricsBindAddress": ("metrics_bind_address", _bind),
    "healthzBindAddress": ("healthz_bind_address", _bind),
    "configSyncPeriod": ("config_sync_period", parse_duration),
    "syncPeriod": ("sync_period", parse_duration),
    "minSyncPeriod": ("min_sync_period", parse_duration),
}
def _lb_algorithm(value: Any, where: str) -> str:
    if value not in ("random", "maglev"):
        raise ConfigError(f"{where}: must be random or maglev, got {value!r}")
    return str(value)


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _maglev_size(value: Any, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or not 251 <= n <= 131071 or not _is_prime(n):
        raise ConfigError(f"{where}: must be a prime from 251 to 131071 (e.g. 251, 1021, "
                          f"4093, 16381, 65521), got {value!r}")
    return n


def _masq_addresses(value: Any, where: str) -> str:
    if value in ("", None):
        return ""
    try:
        ips = [ipaddress.ip_address(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{where}: must be IP addresses, at most one per family, "
                          f"got {value!r}") from None
    if len({ip.version for ip in ips}) != len(ips):
        raise ConfigError(f"{where}: at most one address per family, got {value!r}")
    return ",".join(str(ip) for ip in sorted(ips, key=lambda ip: ip.version))


def _ipvs_scheduler(value: Any, where: str) -> str:
    from controller.datapaths.ipvs.render import SCHEDULERS

    if value not in SCHEDULERS:
        raise ConfigError(f"{where}: must be one of {', '.join(SCHEDULERS)}, got {value!r}")
    return str(value)


def _iptables_backend(value: Any, where: str) -> str:
    if value not in ("auto", "nft", "legacy"):
        raise ConfigError(f"{where}: must be auto, nft or legacy, got {value!r}")
    return str(value)


_KPR: dict[str, tuple[str, Any]] = {
    "iptablesBackend": ("iptables_backend", _iptables_backend),
    "cgroupRoot": ("cgroup_root", _str),
    "loadBalancing": ("lb_algorithm", _lb_algorithm),
    "maglevTableSize": ("maglev_table_size", _maglev_size),
    "masqueradeAddress": ("masquerade_address", _masq_addresses),
    "source": ("source", _source),
    "fullSyncPeriod": ("full_sync_period", parse_duration),
    "interfaces": ("interfaces", _interfaces),
    "instance": ("instance", _str),
    "bpffsRoot": ("bpffs_root", _str),
    "serviceProxyName": ("service_proxy_name", _str),
    "pollInterval": ("poll_interval", parse_duration),
    "cleanupOnExit": ("cleanup_on_exit", _bool),
}


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {value!r}")
    return value


def parse_file(text: str, name: str = "config") -> tuple[dict[str, Any], list[str]]:
    """Parse a config file into ProxyConfig keyword arguments (only fields it sets),
    plus the kube-proxy fields it ignored."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {e}") from None
    doc = _mapping(doc, name)
    api = doc.get("apiVersion")
    if api not in (None, API_VERSION, "kubeproxy.config.k8s.io/v1alpha2"):
        raise ConfigError(f"{name}: apiVersion: must be {API_VERSION}, got {api!r}")
    if doc.get("kind") not in (None, KIND):
        raise ConfigError(f"{name}: kind: must be {KIND}, got {doc.get('kind')!r}")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    per_mode: dict[tuple[str, str], float] = {}
    for key, value in doc.items():
        where = f"{name}: {key}"
        if key in ("apiVersion", "kind"):
            continue
        if key in _TOP:
            attr, parse = _TOP[key]
            out[attr] = parse(value, where)
        elif key == "clientConnection":
            cc = _mapping(value, where)
            for k, v in cc.items():
                if k == "kubeconfig":
                    out["kubeconfig"] = _str(v, f"{where}.kubeconfig")
                elif k not in ("acceptContentTypes", "contentType", "qps", "burst"):
                    raise ConfigError(f"{where}.{k}: unknown field")
        elif key == "conntrack":
            for k, v in _mapping(value, where).items():
                if k in ("tcpEstablishedTimeout", "tcpCloseWaitTimeout"):
                    attr = ("conntrack_tcp_established" if k == "tcpEstablishedTimeout"
                            else "conntrack_tcp_close_wait")
                    secs = parse_duration(v, f"{where}.{k}")
                    if secs:  # 0: leave it as it is (kube-proxy's meaning)
                        out[attr] = secs
                else:
                    ignored.append(f"{key}.{k}")
        elif key in ("iptables", "ipvs", "nftables"):
            block = _mapping(value, where)
            for k, v in block.items():
                if k in ("syncPeriod", "minSyncPeriod"):
                    # v1alpha1 keeps the periods per mode; the one for the mode in use
                    # wins below, any of them is better than the default.
                    attr = "sync_period" if k == "syncPeriod" else "min_sync_period"
                    per_mode[(key, attr)] = parse_duration(v, f"{where}.{k}")
                elif k == "masqueradeAll" and key == "iptables":
                    out["masquerade_all"] = _bool(v, f"{where}.{k}")
                elif k == "scheduler" and key == "ipvs":
                    if v not in ("", None):
                        out["ipvs_scheduler"] = _ipvs_scheduler(v, f"{where}.{k}")
                else:
                    ignored.append(f"{key}.{k}")
        elif key == "kpr":
            for k, v in _mapping(value, where).items():
                w = f"{where}.{k}"
                if k in _KPR:
                    attr, parse = _KPR[k]
                    out[attr] = parse(v, w)
                elif k == "mapSizes":
                    sizes = {}
                    for sk, sv in _mapping(v, w).items():
                        if sk not in ("services", "slots", "backends", "conntrack"):
                            raise ConfigError(f"{w}.{sk}: unknown field")
                        sizes[sk] = _size(sv, f"{w}.{sk}")
                    out["map_sizes"] = MapSizesConfig(**sizes)
                else:
                    raise ConfigError(f"{w}: unknown field")
        elif key in IGNORED_KUBE_PROXY_FIELDS:
            ignored.append(key)
        else:
            raise ConfigError(f"{where}: unknown field")
    # per-mode periods: top-level (v1alpha2) first, then the mode's block
    mode = out.get("mode", "ebpf")
    for attr in ("sync_period", "min_sync_period"):
        found = {block: v for (block, a), v in per_mode.items() if a == attr}
        if attr not in out and found:
            out[attr] = found.get(mode, found.get("iptables", next(iter(found.values()))))
    return out, ignored


def validate(cfg: ProxyConfig) -> ProxyConfig:
    """Cross-field checks."""
    if cfg.sync_period <= 0:
        raise ConfigError(f"syncPeriod: must be positive, got {cfg.sync_period}")
    if cfg.min_sync_period > cfg.sync_period:
        raise ConfigError(f"minSyncPeriod: {cfg.min_sync_period}s must not exceed "
                          f"syncPeriod {cfg.sync_period}s")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.instance):
        raise ConfigError(f"kpr.instance: must be 1-64 letters, digits, '_', '.' or '-', "
                          f"got {cfg.instance!r}")
    return cfg


FLAG_FIELDS = {f.name for f in fields(ProxyConfig)}


def load(path: str | None, overrides: Mapping[str, Any]) -> tuple[ProxyConfig, list[str]]:
    """Defaults < file < overrides (flags the user gave). Returns the config and the
    ignored kube-proxy fields."""
    kw: dict[str, Any] = {}
    ignored: list[str] = []
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        kw, ignored = parse_file(text, path)
    cfg = replace(ProxyConfig(), **kw)
    flags = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(flags) - FLAG_FIELDS
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    return validate(replace(cfg, **flags)), ignored


def flag_overrides(**raw: Any) -> dict[str, Any]:
    """Validate flag values (strings from argparse) into ProxyConfig fields."""
    out: dict[str, Any] = {}
    parsers: dict[str, tuple[str, Any]] = {
        "mode": ("--proxy-mode", _mode),
        "source": ("--source", _source),
        "kubeconfig": ("--kubeconfig", _str),
        "master": ("--master", _str),
        "hostname_override": ("--hostname-override", _str),
        "cluster_cidrs": ("--cluster-cidr", _cidrs),
        "nodeport_addresses": ("--nodeport-addresses", _nodeport_addresses),
        "metrics_bind_address": ("--metrics-bind-address", _bind),
        "healthz_bind_address": ("--healthz-bind-address", _bind),
        "sync_period": ("--sync-period", parse_duration),
        "min_sync_period": ("--min-sync-period", parse_duration),
        "config_sync_period": ("--config-sync-period", parse_duration),
        "full_sync_period": ("--full-sync-period", parse_duration),
        "masquerade_all": ("--masquerade-all", _bool),
        "interfaces": ("--interfaces", _interfaces),
        "instance": ("--instance", _str),
        "bpffs_root": ("--bpffs-root", _str),
        "poll_interval": ("--poll-interval", parse_duration),
        "cleanup_on_exit": ("--cleanup-on-exit", _bool),
        "lb_algorithm": ("--lb-algorithm", _lb_algorithm),
        "maglev_table_size": ("--maglev-table-size", _maglev_size),
        "masquerade_address": ("--masquerade-address", _masq_addresses),
        "cgroup_root": ("--cgroup-root", _str),
        "iptables_backend": ("--iptables-backend", _iptables_backend),
        "ipvs_scheduler": ("--ipvs-scheduler", _ipvs_scheduler),
        "conntrack_tcp_established": ("--conntrack-tcp-timeout-established",
                                      parse_duration),
        "conntrack_tcp_close_wait": ("--conntrack-tcp-timeout-close-wait", parse_duration),
    }
    for k, v in raw.items():
        if v is None:
            continue
        flag, parse = parsers[k]
        out[k] = parse(v, flag)
    return out
