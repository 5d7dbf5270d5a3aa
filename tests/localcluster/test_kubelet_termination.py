"""Termination messages: what a container leaves at its terminationMessagePath (or, failing
with FallbackToLogsOnError, its log's tail) shows up in containerStatuses[].state.terminated."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_tools import Cluster, pod_manifest

from kubetune.localcluster.kubelet import containerlogs, termination


def _terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def test_message_written_to_the_default_path_is_reported(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("says-done", ["sh", "-c", "printf '{\"steps\": 30}' > /dev/termination-log"]))
    done = cluster.wait_phase("says-done", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    assert _terminated(done)["message"] == '{"steps": 30}'


def test_custom_path_and_fallback_to_logs_on_error(cluster: Cluster) -> None:
    custom = pod_manifest(
        "custom-path", ["sh", "-c", "echo failing > /run/kt-message; exit 2"],
        container={"terminationMessagePath": "/run/kt-message", "terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    noisy = pod_manifest(
        "noisy-failure", ["sh", "-c", "for i in $(seq 1 100); do echo line $i; done; exit 1"],
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    silent = pod_manifest("silent-failure", ["sh", "-c", "echo only in the log; exit 1"])
    cluster.apply(custom, noisy, silent)

    written = _terminated(cluster.wait_phase("custom-path", {"Succeeded", "Failed"}))
    assert (written["exitCode"], written["message"]) == (2, "failing\n")  # the file wins over the log

    tail = _terminated(cluster.wait_phase("noisy-failure", {"Succeeded", "Failed"}))["message"].splitlines()
    assert tail == [f"line {i}" for i in range(21, 101)]  # the last 80 lines

    assert "message" not in _terminated(cluster.wait_phase("silent-failure", {"Succeeded", "Failed"}))


def test_without_mount_namespaces_the_path_comes_in_an_env_var(tmp_path: Path, monkeypatch) -> None:
    from kubetune.localcluster import network
    from kubetune.localcluster.cluster import LocalCluster

    monkeypatch.setattr(network, "mount_namespaces_supported", lambda: False)
    with LocalCluster(state_dir=tmp_path, network="loopback") as local:
        loopback = Cluster(local)
        loopback.apply(pod_manifest("env-path", ["sh", "-c", f"printf ok > ${termination.PATH_ENV}"]))
        done = loopback.wait_phase("env-path", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert _terminated(done)["message"] == "ok"


def _cri_log(path: Path, lines: list[str]) -> None:
    with open(path, "wb") as sink:
        for line in lines:
            sink.write(containerlogs.Record(containerlogs.timestamp(), "stdout", True, line.encode()).encode())


def test_log_tail_keeps_whole_lines_within_the_byte_limit(tmp_path: Path) -> None:
    log = tmp_path / "main.0.log"
    _cri_log(log, [f"{i:04d} " + "x" * 95 for i in range(100)])  # 101 bytes a line
    tail = containerlogs.plain_tail(log, termination.MAX_LOG_LINES, termination.MAX_LOG_BYTES).splitlines()
    assert len("\n".join(tail).encode()) <= termination.MAX_LOG_BYTES
    assert tail[-1].startswith("0099") and all(len(line) == 100 for line in tail)
    assert containerlogs.plain_tail(tmp_path / "absent.log", 80, 2048) == ""


@pytest.mark.parametrize(("written", "code", "policy", "expected"), [
    (b"", 1, "FallbackToLogsOnError", "the log"),
    (b"", 0, "FallbackToLogsOnError", None),
    (b"", 1, "File", None),
    (b"m" * 5000, 1, "FallbackToLogsOnError", "m" * 4096),
])
def test_read_message_follows_the_policy(tmp_path: Path, written: bytes, code: int, policy: str, expected) -> None:
    (tmp_path / "msg").write_bytes(written)
    _cri_log(tmp_path / "log", ["the log"])
    spec = {"terminationMessagePolicy": policy}
    assert termination.read_message(spec, tmp_path / "msg", tmp_path / "log", code) == expected


def test_a_termination_file_mount_point_lives_as_long_as_its_last_pod(tmp_path: Path) -> None:
    from kubetune.localcluster.mountpoints import MountPoints

    points = MountPoints()
    target = tmp_path / "dev" / "termination-log"
    first = points.claim_file(str(target))
    second = points.claim_file(str(target))
    assert target.is_file() and target.read_bytes() == b""
    target.write_text("a stray write from outside any pod")
    points.release(first)
    assert target.exists()  # the second pod's bind mount still hangs on it
    points.release(second)
    assert not target.exists() and not target.parent.exists()

    existing = tmp_path / "termination-log"
    existing.write_text("not ours")
    points.release(points.claim_file(str(existing)))
    assert existing.read_text() == "not ours"  # a file the kubelet did not create is left alone
