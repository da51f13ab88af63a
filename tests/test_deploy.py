"""deploy/ and the Dockerfile: schema-valid, least privilege, and consistent with kpr.

Manifests are validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail) for the oldest and newest versions we support. The
ConfigMap's embedded config is loaded by kpr's own config loader. No Docker engine
runs on these machines, so the Dockerfile is checked by reading it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.config import parse_file

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
VERSIONS = ["1.29", "1.34"]


def manifests() -> dict[str, dict[str, Any]]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            out[doc["kind"]] = doc
    return out


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    assert kust["namespace"] == "kube-system"


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_schemas(version: str) -> None:
    docs = manifests()
    assert set(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                         "DaemonSet"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    ds = copy.deepcopy(manifests()["DaemonSet"])
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pathh"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


def test_daemonset_is_a_node_critical_host_network_proxy() -> None:
    ds = manifests()["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    [c] = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["port"] == 10256
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) >= {"BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src", "/etc/kpr"} <= mounts
    # the only privileged container is the one-shot bpffs mounter
    [init] = pod["initContainers"]
    assert init["securityContext"]["privileged"] is True and "mount -t bpf" in init["command"][-1]


def test_cluster_role_is_least_privilege() -> None:
    rules = manifests()["ClusterRole"]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {
        ("", "services", "list"), ("", "services", "watch"),
        ("", "nodes", "list"), ("", "nodes", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "events", "create"), ("", "events", "patch"),
        ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")}
    binding = manifests()["ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kpr",
                                    "namespace": "kube-system"}]


def test_configmap_config_is_valid_for_kpr() -> None:
    text = manifests()["ConfigMap"]["data"]["config.yaml"]
    cfg, ignored = parse_file(text, "configmap")
    assert cfg["mode"] == "ebpf" and cfg["source"] == "kube" and not ignored
    ds = manifests()["DaemonSet"]
    assert "--config=/etc/kpr/config.yaml" in ds["spec"]["template"]["spec"]["containers"][0][
        "command"]


def test_dockerfile_builds_the_node_image_from_bookworm() -> None:
    text = (DEPLOY.parent / "Dockerfile").read_text()
    assert next(line for line in text.splitlines()
                if line.startswith("FROM")).startswith("FROM debian:bookworm")
    for pkg in ("python3-bpfcc", "linux-headers-amd64", "iproute2", "nftables", "iptables"):
        assert pkg in text
    assert "KPR_BPF_DIR=/opt/kpr/bpf" in text and "COPY bpf" in text
