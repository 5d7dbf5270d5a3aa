"""Rendering the chart with real Helm (helm-python-sdk, no cluster): what each switch produces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RELEASE, NAMESPACE = "kubetune", "kubetune-system"

# Each switch a user turns, as values: every one renders (tests/chart) and every object it
# renders is accepted by the API server in a restricted namespace (tests/chart/test_chart_on_cluster).
SWITCHES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"scope": "Namespace", "watchNamespace": "ml"},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "pod-monitor": {"metrics": {"podMonitor": {"enabled": True}}},
    "alerts-and-dashboard": {"metrics": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}},
    "network-policy": {"networkPolicy": {"enabled": True, "workerNamespaces": ["ml"],
                                         "s3CIDRs": ["10.0.0.0/8"], "apiServerCIDRs": ["10.96.0.1/32"]}},
    "crds-off": {"crds": {"enabled": False}},
    "replicas": {"replicaCount": 2},
    "namespaced-replicas": {"scope": "Namespace", "replicaCount": 3},
}


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, as Helm would install them."""
    import helm_python as helm

    rendered = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=namespace)
    objects = []
    for path, text in rendered.items():
        if path.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def notes(values: dict[str, Any] | None = None) -> str:
    import helm_python as helm

    rendered = helm.Chart.load(str(CHART)).render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
