"""The local Prometheus' configuration from monitors, as prometheus-operator writes it: checked
by Prometheus' own `promtool check config`, and against the chart's monitors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.localcluster.prometheus import UnsupportedMonitor, label_name, rule_groups, scrape_configs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "chart"))
from chart_tools import one, render  # noqa: E402

PROMTOOL = str(Path(sys.executable).parent / "promtool")
MONITORED = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                         "prometheusRule": {"enabled": True}}}


def configs(tmp_path: Path) -> list[dict]:
    objects = render(MONITORED)
    token = tmp_path / "token"
    token.write_text("t")
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    return scrape_configs([one(objects, "ServiceMonitor"), one(objects, "PodMonitor")],
                          "https://10.0.0.1:6443", str(ca), str(token))


def test_the_charts_monitors_become_a_config_prometheus_accepts(tmp_path: Path) -> None:
    config = {"global": {"scrape_interval": "5s"}, "rule_files": ["rules.yml"], "scrape_configs": configs(tmp_path)}
    rules = {"groups": rule_groups([one(render(MONITORED), "PrometheusRule")])}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout + result.stderr


def test_targets_are_kept_by_the_monitors_selectors_and_ports(tmp_path: Path) -> None:
    by_name = {config["job_name"]: config for config in configs(tmp_path)}
    pods = by_name["podMonitor/kubetune-system/kubetune-training/0"]
    keep = [r for r in pods["relabel_configs"] if r.get("action") == "keep"]
    assert {"action": "keep", "source_labels": ["__meta_kubernetes_pod_label_kubetune_dev_replica_index",
                                                "__meta_kubernetes_pod_labelpresent_kubetune_dev_replica_index"],
            "regex": "(0);true"} in keep
    assert {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "metrics"} in keep
    assert pods["kubernetes_sd_configs"][0]["role"] == "pod" and "namespaces" not in pods["kubernetes_sd_configs"][0]
    assert {"source_labels": ["__meta_kubernetes_pod_label_kubetune_dev_job_name"],
            "target_label": "finetunejob"} in pods["relabel_configs"]

    service = by_name["serviceMonitor/kubetune-system/kubetune/0"]
    assert service["honor_labels"] is True and service["scrape_interval"] == "30s"
    assert service["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["kubetune-system"]}
    assert service["kubernetes_sd_configs"][0]["authorization"]["credentials_file"].endswith("token")


def test_a_monitor_field_not_implemented_is_named() -> None:
    monitor = {"kind": "PodMonitor", "metadata": {"namespace": "ml", "name": "m"},
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "podMetricsEndpoints": [{"port": "metrics", "metricRelabelings": []}]}}
    with pytest.raises(UnsupportedMonitor, match=r"PodMonitor ml/m: .* metricRelabelings \(endpoint\)"):
        scrape_configs([monitor], "https://a", "ca", "token")


def test_label_names_are_spelled_as_discovery_spells_them() -> None:
    assert label_name("app.kubernetes.io/name") == "app_kubernetes_io_name"
    assert label_name("kubetune.dev/job-name") == "kubetune_dev_job_name"
