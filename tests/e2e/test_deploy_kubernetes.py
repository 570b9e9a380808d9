"""deploy/kubernetes/: the manifests parse and hang together.

Structural checks with PyYAML always; schema validation against the
Kubernetes OpenAPI schemas when kubernetes-validate (bundled schemas,
works offline) is installed.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from relay import config, configload
from tests.support.deploy import K8S, k8s_by_kind, k8s_documents

#: Kinds that are not core Kubernetes (no bundled schema).
CUSTOM_KINDS = {"ServiceMonitor", "Kustomization"}


def statefulset() -> dict[str, Any]:
    (sts,) = k8s_by_kind("StatefulSet")
    return sts


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = statefulset()["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return found


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = statefulset()["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture
def relay_config(tmp_path: Path) -> config.Config:
    (configmap,) = k8s_by_kind("ConfigMap")
    path = tmp_path / "relay.toml"
    path.write_text(configmap["data"]["relay.toml"])
    return configload.load(path)


def test_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in k8s_documents())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Kustomization",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
            "StatefulSet",
        ]
    )


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = k8s_by_kind("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_each_relay_owns_its_spool_volume(relay_config: config.Config) -> None:
    (claim,) = statefulset()["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["name"]: m for m in container("relay")["volumeMounts"]}
    spool_dir = Path(mounts[claim["metadata"]["name"]]["mountPath"])
    assert relay_config.queue.path.is_relative_to(spool_dir)
    assert relay_config.audit.path.is_relative_to(spool_dir)
    assert not mounts[claim["metadata"]["name"]].get("readOnly", False)


def test_config_map_is_mounted_as_a_directory_where_the_relay_reads_it() -> None:
    (configmap,) = k8s_by_kind("ConfigMap")
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for name in ("relay", "config-reloader"):
        mounts = [m for m in container(name)["volumeMounts"] if m["name"] == "config"]
        (mount,) = mounts
        # A subPath mount is never updated by the kubelet: reload would never see a change.
        assert "subPath" not in mount
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    args = container("relay")["args"]
    config_path = args[args.index("--config") + 1]
    mount_path = next(
        m["mountPath"] for m in container("relay")["volumeMounts"] if m["name"] == "config"
    )
    assert config_path == f"{mount_path}/relay.toml"
    assert "relay.toml" in configmap["data"]


def test_reloader_signals_the_pid_the_relay_writes(relay_config: config.Config) -> None:
    assert pod_spec()["shareProcessNamespace"] is True
    script = container("config-reloader")["command"][-1]
    assert f'kill -HUP "$(cat {relay_config.pid_file})"' in script
    assert "sha256sum /etc/relay/relay.toml" in script
    reloader_mounts = {m["mountPath"] for m in container("config-reloader")["volumeMounts"]}
    assert any(relay_config.pid_file.is_relative_to(p) for p in reloader_mounts)
    assert shlex.split(script)  # well-formed shell words


def test_ports_match_the_config(relay_config: config.Config) -> None:
    ports = {p["name"]: p["containerPort"] for p in container("relay")["ports"]}
    assert ports["smtp"] in {listen.port for listen in relay_config.server.listen}
    assert relay_config.metrics.listen is not None
    assert ports["metrics"] == relay_config.metrics.listen.port
    # Bound on all interfaces, or probes and the Service cannot reach it.
    assert relay_config.metrics.listen.host == "0.0.0.0"
    assert all(listen.host == "0.0.0.0" for listen in relay_config.server.listen)
    annotations = statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("probe", ["readinessProbe", "livenessProbe"])
def test_probes_hit_healthz_on_the_metrics_port(probe: str) -> None:
    get = container("relay")[probe]["httpGet"]
    assert get["path"] == "/healthz"
    assert get["port"] == "metrics"


def test_grace_period_lets_deliveries_drain() -> None:
    assert pod_spec()["terminationGracePeriodSeconds"] >= 90


def test_runs_non_root_with_a_read_only_root() -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    for c in pod_spec()["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_pdb_and_services_select_the_relay_pods() -> None:
    labels = pod_labels()
    sts = statefulset()
    assert selects(sts["spec"]["selector"]["matchLabels"], labels)
    (pdb,) = k8s_by_kind("PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    services = {s["metadata"]["name"]: s for s in k8s_by_kind("Service")}
    assert sts["spec"]["serviceName"] in services
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    port_names = {p["name"] for p in container("relay")["ports"]}
    for service in services.values():
        assert selects(service["spec"]["selector"], labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_service_monitor_scrapes_the_metrics_port() -> None:
    (monitor,) = k8s_by_kind("ServiceMonitor")
    matched = [
        s
        for s in k8s_by_kind("Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    with_port = [s for s in matched if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert len(with_port) == 1, "exactly one Service should expose the metrics port"


def test_smtp_service_port_25_reaches_the_smtp_container_port() -> None:
    (service,) = [s for s in k8s_by_kind("Service") if s["metadata"]["name"] == "relay"]
    smtp = next(p for p in service["spec"]["ports"] if p["name"] == "smtp")
    assert smtp["port"] == 25 and smtp["targetPort"] == "smtp"


DOCS = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path, doc in k8s_documents()
    if doc["kind"] not in CUSTOM_KINDS
]


@pytest.mark.parametrize("doc", DOCS)
def test_schema_valid(doc: dict[str, Any]) -> None:
    import kubernetes_validate as kv  # a test dependency (pyproject.toml [test])

    kv.validate(doc, kv.latest_version(), strict=True)


def test_kustomization_sets_the_image_of_both_containers() -> None:
    (kustomization,) = k8s_by_kind("Kustomization")
    names = {image["name"] for image in kustomization["images"]}
    images = {c["image"].split(":")[0] for c in pod_spec()["containers"]}
    assert images == names == {"relay"}
