from __future__ import annotations

import argparse

import pytest
from kubetune.operator import main as entry


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"namespace": None, "leader_elect": None, "liveness_port": None, "metrics_port": None}),
        (
            ["-n", "ml", "--leader-elect", "kubetune", "--liveness-port", "8080", "--metrics-port", "0"],
            {"namespace": "ml", "leader_elect": "kubetune", "liveness_port": 8080, "metrics_port": 0},
        ),
    ],
)
def test_command_line_reaches_run(argv: list[str], expected: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(entry, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr("kubetune.operator.kube.load_credentials", lambda: None)
    parser = argparse.ArgumentParser()
    entry.add_arguments(parser)
    assert entry.main(parser.parse_args(argv)) == 0
    assert calls == [expected]


def test_run_watches_the_given_namespace_or_all(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    seen: list[dict] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setenv("KUBETUNE_NAMESPACE", "from-env")
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    entry.run()
    entry.run(namespace="ml", leader_elect="kubetune")
    monkeypatch.setenv("KUBETUNE_NAMESPACE", "")
    monkeypatch.setenv("POD_NAMESPACE", "kubetune-system")
    entry.run(leader_elect="kubetune")
    assert [(call["clusterwide"], list(call["namespaces"]), call["standalone"]) for call in seen] == [
        (False, ["from-env"], True),
        (False, ["ml"], True),
        (True, [], True),
    ]
    # The Lease lives in the operator's own namespace when it runs in a pod, else the watched one.
    assert [(call["memo"].lease, call["memo"].lease_namespace) for call in seen] == [
        (None, "from-env"), ("kubetune", "ml"), ("kubetune", "kubetune-system")]
    # The handlers get their settings through kopf's memo, not a module global.
    assert [call["memo"].settings.namespace for call in seen] == ["from-env", "ml", None]


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"KUBECONFIG": "/nonexistent/kubeconfig", "HOME": "/nonexistent"},
            "no Kubernetes credentials: set KUBECONFIG",
        ),
        ({"KUBETUNE_LIVENESS_PORT": "http"}, "KUBETUNE_LIVENESS_PORT='http' is not a port number"),
    ],
)
def test_unusable_environment_exits_with_one_clear_line(
    env: dict, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(entry, "run", lambda **kwargs: pytest.fail("must not start kopf"))
    parser = argparse.ArgumentParser()
    entry.add_arguments(parser)
    assert entry.main(parser.parse_args([])) == 2
    assert message in capsys.readouterr().err


def test_a_taken_metrics_port_exits_with_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    import kopf

    monkeypatch.setattr("kubetune.operator.kube.load_credentials", lambda: None)
    monkeypatch.setattr(kopf, "run", lambda **kwargs: pytest.fail("must not start kopf"))
    parser = argparse.ArgumentParser()
    entry.add_arguments(parser)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert entry.main(parser.parse_args(["--metrics-port", str(port)])) == 2
    assert f"cannot serve metrics on port {port}" in capsys.readouterr().err
