"""Config file + flags, and the health semantics behind /healthz and /livez."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.cli import _load_config, build_parser
from controller.config import ConfigError, load, parse_duration
from controller.metrics import ProxyHealth

CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ebpf
clusterCIDR: 10.244.0.0/16,fd00:244::/56
hostnameOverride: node-7
nodePortAddresses: [primary, 192.168.0.0/16]
metricsBindAddress: 0.0.0.0:10249
configSyncPeriod: 15m
clientConnection:
  kubeconfig: /etc/kpr/kubeconfig
  qps: 5
iptables:
  syncPeriod: 1m0s
  minSyncPeriod: 500ms
  masqueradeAll: true
conntrack:
  maxPerCore: 32768
kpr:
  interfaces: [eth0, "veth*"]
  instance: node7
  mapSizes: {services: 131072}
"""


def run_args(tmp_path: Path, text: str, *flags: str) -> object:
    f = tmp_path / "config.yaml"
    f.write_text(text)
    return _load_config(build_parser().parse_args(["run", "--config", str(f), *flags]))


def test_kube_proxy_config_file_is_read_with_its_meaning(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = run_args(tmp_path, CONFIG)
    assert cfg.mode == "ebpf" and cfg.hostname_override == "node-7"  # type: ignore[attr-defined]
    assert [str(c) for c in cfg.cluster_cidrs] == ["10.244.0.0/16", "fd00:244::/56"]  # type: ignore[attr-defined]
    assert cfg.nodeport_addresses == ("primary", "192.168.0.0/16")  # type: ignore[attr-defined]
    assert cfg.config_sync_period == 900 and cfg.sync_period == 60  # type: ignore[attr-defined]
    assert cfg.min_sync_period == 0.5 and cfg.masquerade_all  # type: ignore[attr-defined]
    assert cfg.kubeconfig == "/etc/kpr/kubeconfig"  # type: ignore[attr-defined]
    assert cfg.interfaces == ("eth0", "veth*") and cfg.instance == "node7"  # type: ignore[attr-defined]
    assert cfg.map_sizes.services == 131072  # type: ignore[attr-defined]
    assert "conntrack" in caplog.text  # ignored kube-proxy fields are named


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = run_args(tmp_path, CONFIG, "--proxy-mode", "auto", "--hostname-override", "n9",
                   "--metrics-bind-address", "127.0.0.1:0", "--sync-period", "45s",
                   "--cluster-cidr", "10.0.0.0/8")
    assert cfg.mode == "auto" and cfg.hostname_override == "n9"  # type: ignore[attr-defined]
    assert cfg.metrics_bind_address == "127.0.0.1:0" and cfg.sync_period == 45  # type: ignore[attr-defined]
    assert [str(c) for c in cfg.cluster_cidrs] == ["10.0.0.0/8"]  # type: ignore[attr-defined]
    assert cfg.instance == "node7"  # type: ignore[attr-defined]  # from the file


@pytest.mark.parametrize("text,message", [
    ("mode: userspace\n", "mode: must be one of ebpf, auto, nftables, iptables, ipvs, "
                          "got 'userspace'"),
    ("nodePortAddresses: [primary, 10.0.0/33]\n",
     "nodePortAddresses[1]: '10.0.0/33' is not a CIDR or \"primary\""),
    ("clusterCIDR: 10.244.0.0/16,banana\n", "clusterCIDR[1]: 'banana' is not a CIDR"),
    ("healthzBindAddress: 0.0.0.0\n", "healthzBindAddress: must be host:port"),
    ("metricsBindAddress: 'localhost:99999'\n", "metricsBindAddress: must be IP:port"),
    ("configSyncPeriod: 15 minutes\n", "configSyncPeriod: must be a duration like 30s or 15m,"
                                       " got '15 minutes'"),
    ("kind: KubeletConfiguration\n", "kind: must be KubeProxyConfiguration"),
    ("syncPeriod: 1s\nminSyncPeriod: 5s\n", "minSyncPeriod: 5.0s must not exceed syncPeriod"),
    ("bogusField: 1\n", "bogusField: unknown field"),
    ("kpr:\n  mapSizes: {services: -1}\n", "kpr.mapSizes.services: must be an integer"),
    ("kpr:\n  interfaces: []\n", "kpr.interfaces: must name at least one link"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_invalid_config_names_field_and_value(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(str(f), {})
    assert message in str(e.value)


def test_invalid_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--nodeport-addresses\\[0\\]: 'x' is not a CIDR"):
        _load_config(build_parser().parse_args(["run", "--nodeport-addresses", "x"]))


@pytest.mark.parametrize("text,seconds", [("15m", 900), ("1h0m0s", 3600), ("500ms", 0.5),
                                          ("1m30s", 90), ("30", 30), (2, 2)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "x") == seconds


def test_health_follows_kube_proxy_semantics() -> None:
    now = [1000.0]
    h = ProxyHealth(timeout=60, clock=lambda: now[0])
    assert h.healthy()[0]  # starting up, nothing queued
    h.queued()
    now[0] += 59
    assert h.healthy()[0]  # queued, not late yet
    now[0] += 1
    assert not h.healthy()[0]  # a change waited 2 x syncPeriod
    h.updated()
    assert h.healthy() == (True, 1060.0)
    h.queued()
    now[0] += 30
    h.queued()  # a newer change does not reset the oldest
    now[0] += 30
    assert not h.healthy()[0]
