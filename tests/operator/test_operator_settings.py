from __future__ import annotations

import pytest
from kubetune.operator.settings import OperatorSettings, SettingsError


def test_defaults_without_environment() -> None:
    settings = OperatorSettings.from_env({})
    assert settings == OperatorSettings(
        s3_endpoint=None,
        trainer_image="kubetune/trainer:0.1.0",
        namespace=None,
        trainer_metrics_port=9400,
        liveness_port=None,
        metrics_port=8080,
        restart_backoff_seconds=10,
        api_timeout_seconds=70,
    )


def test_values_from_environment() -> None:
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_S3_ENDPOINT": "http://s3.kubetune-system.svc.cluster.local:9000",
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer:1.2",
            "KUBETUNE_NAMESPACE": "ml",
            "KUBETUNE_TRAINER_METRICS_PORT": "9500",
            "KUBETUNE_LIVENESS_PORT": "8080",
            "KUBETUNE_METRICS_PORT": "9090",
            "KUBETUNE_RESTART_BACKOFF_SECONDS": "30",
            "KUBETUNE_API_TIMEOUT_SECONDS": "5",
        }
    )
    assert settings.s3_endpoint == "http://s3.kubetune-system.svc.cluster.local:9000"
    assert settings.trainer_image == "registry.example/trainer:1.2"
    assert settings.namespace == "ml"
    assert settings.trainer_metrics_port == 9500
    assert settings.liveness_port == 8080
    assert settings.metrics_port == 9090
    assert settings.restart_backoff_seconds == 30
    assert settings.api_timeout_seconds == 5


def test_metrics_port_0_turns_the_operator_metrics_off() -> None:
    assert OperatorSettings.from_env({"KUBETUNE_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(SettingsError, match=r"KUBETUNE_METRICS_PORT='x' is not a port number; set it to 0 \(off\)"):
        OperatorSettings.from_env({"KUBETUNE_METRICS_PORT": "x"})


def test_empty_namespace_means_all_namespaces() -> None:
    assert OperatorSettings.from_env({"KUBETUNE_NAMESPACE": ""}).namespace is None


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_bad_port_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="KUBETUNE_LIVENESS_PORT"):
        OperatorSettings.from_env({"KUBETUNE_LIVENESS_PORT": value})


@pytest.mark.parametrize("value", ["soon", "-1", "3601"])
def test_a_bad_restart_backoff_names_the_variable_and_the_range(value: str) -> None:
    with pytest.raises(SettingsError, match=r"KUBETUNE_RESTART_BACKOFF_SECONDS=.* set it to 0..3600"):
        OperatorSettings.from_env({"KUBETUNE_RESTART_BACKOFF_SECONDS": value})


@pytest.mark.parametrize("value", ["soon", "0", "3601"])
def test_a_bad_api_timeout_names_the_variable_and_the_range(value: str) -> None:
    # 0 would give up on every request at once: never what anyone means.
    with pytest.raises(SettingsError, match=r"KUBETUNE_API_TIMEOUT_SECONDS=.* set it to 1..3600"):
        OperatorSettings.from_env({"KUBETUNE_API_TIMEOUT_SECONDS": value})
