"""Pure parts of the node agent: env resolution, volume files, hosts files, pod phase and status."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from kubetune.localcluster import hostsfile
from kubetune.localcluster.kubelet import podconfig
from kubetune.localcluster.kubelet.podstatus import ContainerState, PodState, build_status, pod_phase

FACTS = podconfig.PodFacts(pod_ip="10.0.0.2", node_name="kubetune-local", host_ip="10.0.0.1")
POD = {"metadata": {"name": "w-0", "namespace": "ml", "labels": {"role": "worker"}}, "spec": {}}


def test_env_resolves_refs_fields_and_expansion() -> None:
    container = {
        "envFrom": [{"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "A", "value": "one"},
            {"name": "B", "value": "$(A)-two-$$(A)-$(UNKNOWN)"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        ],
    }
    objects = {("secret", "creds"): {"key": b"v", "OTHER": b"x"}}

    env = podconfig.resolve_env(POD, container, objects, FACTS)

    assert env == {"A": "one", "B": "one-two-$(A)-$(UNKNOWN)", "KEY": "v", "key": "v", "OTHER": "x",
                   "ROLE": "worker", "IP": "10.0.0.2"}


@pytest.mark.parametrize("ref, message", [
    ({"secretKeyRef": {"name": "gone", "key": "k"}}, 'secret "gone" not found (env X)'),
    ({"configMapKeyRef": {"name": "cm", "key": "missing"}}, "couldn't find key missing in Configmap cm"),
])
def test_missing_reference_is_a_config_error_naming_it(ref: dict, message: str) -> None:
    container = {"env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(podconfig.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        podconfig.resolve_env(POD, container, {("configmap", "cm"): {"k": b"v"}}, FACTS)


def test_volumes_write_items_with_modes_and_decode_secrets(tmp_path: Path) -> None:
    secret = {"data": {"token": base64.b64encode(b"s3cret").decode()}}
    pod = {**POD, "spec": {"volumes": [
        {"name": "creds", "secret": {"secretName": "s", "defaultMode": 0o440,
                                     "items": [{"key": "token", "path": "sub/t", "mode": 0o400}]}},
        {"name": "cfg", "configMap": {"name": "c"}},
        {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}, {
            "path": "config.json", "fieldRef": {"fieldPath": "metadata.annotations['kubetune.dev/trainer-config']"}}]}},
    ]}}
    pod["metadata"] = {**POD["metadata"], "annotations": {"kubetune.dev/trainer-config": '{"schemaVersion":1}'}}
    objects = {("secret", "s"): podconfig.object_data("secret", secret),
               ("configmap", "c"): podconfig.object_data("configmap", {"data": {"a.yaml": "x: 1"}})}

    dirs = podconfig.materialise_volumes(pod, tmp_path, objects, FACTS)

    assert (dirs["creds"] / "sub/t").read_bytes() == b"s3cret"
    assert oct(os.stat(dirs["creds"] / "sub/t").st_mode & 0o777) == oct(0o400)
    assert (dirs["cfg"] / "a.yaml").read_text() == "x: 1"
    assert (dirs["info"] / "labels").read_text() == 'role="worker"'
    assert (dirs["info"] / "config.json").read_text() == '{"schemaVersion":1}'  # one annotation's value, as is
    with pytest.raises(podconfig.ConfigError, match="refers to no volume"):
        podconfig.container_mounts({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, dirs)


def test_hosts_file_names_pods_and_services_and_skips_headless(tmp_path: Path) -> None:
    pod = hostsfile.PodRecord("ml", "job-worker-0", "10.0.0.2", "job-worker-0", "job-workers")
    shared = hostsfile.cluster_lines(
        [pod, hostsfile.PodRecord("ml", "plain", "10.0.0.3")],
        [hostsfile.ServiceRecord("ml", "job-workers", "None"), hostsfile.ServiceRecord("ml", "api", "10.96.0.5")],
        s3_address="10.0.0.1", api_address="10.0.0.1",
    )
    text = hostsfile.render_pod_hosts(pod, shared)

    assert "10.0.0.2\tjob-worker-0\n" in text  # the pod's own hostname, for gloo
    assert "10.0.0.2\tjob-worker-0.job-workers.ml.svc.cluster.local job-worker-0.job-workers job-worker-0" in text
    assert "10.0.0.3\tplain" in text
    assert "10.96.0.5\tapi.ml.svc.cluster.local" in text
    assert "job-workers.ml.svc" not in text.replace("job-worker-0.job-workers.ml.svc", "")
    assert "10.0.0.1\ts3.kubetune-system.svc.cluster.local" in text
    # In-cluster clients that name the API server's service reach the API server itself.
    assert "10.0.0.1\tkubernetes.default.svc.cluster.local kubernetes.default.svc kubernetes.default kubernetes\n" in text


def test_hosts_file_is_rewritten_in_place(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    hostsfile.write_in_place(path, "a long first version\n")
    inode = os.stat(path).st_ino
    hostsfile.write_in_place(path, "short\n")
    assert path.read_text() == "short\n"
    assert os.stat(path).st_ino == inode


def _container(state: str, code: int | None = None, restarted: bool = False) -> ContainerState:
    last = {"exitCode": 1} if restarted else None
    return ContainerState(name="c", image="i", state=state, exit_code=code, last_terminated=last)


# The kubelet's getPhase, case by case.
@pytest.mark.parametrize("policy, containers, terminal, phase", [
    ("Never", [("terminated", 0)], False, "Succeeded"),
    ("Never", [("terminated", 2)], False, "Failed"),
    ("OnFailure", [("terminated", 1)], False, "Running"),
    ("OnFailure", [("terminated", 0)], False, "Succeeded"),
    ("Always", [("terminated", 0)], False, "Running"),
    ("Always", [("waiting", None, True)], False, "Running"),  # CrashLoopBackOff after a run
    ("Never", [("waiting", None)], False, "Pending"),
    ("Always", [("running", None)], False, "Running"),
    ("Never", [("running", None), ("terminated", 0)], False, "Running"),
    ("Never", [("running", None), ("waiting", None)], False, "Pending"),
    ("Never", [("terminated", 0), ("terminated", 1)], False, "Failed"),
    # A deleted pod ends in a terminal phase whatever its restart policy.
    ("Always", [("terminated", 0)], True, "Succeeded"),
    ("Always", [("terminated", 143)], True, "Failed"),
    ("Always", [("waiting", None)], True, "Failed"),
])
def test_pod_phase(policy: str, containers: list[tuple], terminal: bool, phase: str) -> None:
    assert pod_phase(policy, [], [_container(*c) for c in containers], terminal) == phase


def test_pod_phase_with_init_containers() -> None:
    main = [_container("waiting")]
    assert pod_phase("Never", [_container("running")], main) == "Pending"
    assert pod_phase("Never", [_container("terminated", 4)], main) == "Failed"
    assert pod_phase("OnFailure", [_container("terminated", 4)], main) == "Pending"
    assert pod_phase("Never", [_container("terminated", 0)], [_container("running")]) == "Running"


def test_status_patch_names_every_state_so_a_merge_cannot_keep_two() -> None:
    running = ContainerState(name="c", image="i", state="running", started_at="t", pid=7)
    status = build_status(PodState(phase="Running", pod_ip="10.0.0.2"), [running])
    (container,) = status["containerStatuses"]
    assert container["state"] == {"waiting": None, "running": {"startedAt": "t"}, "terminated": None}
    assert (container["ready"], container["containerID"]) == (True, "local://7")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert "qosClass" not in status  # set by the API server at creation, immutable after


def test_mount_points_are_shared_and_removed_after_the_last_user(tmp_path: Path) -> None:
    from kubetune.localcluster.mountpoints import MountPoints

    points = MountPoints()
    first = points.claim([str(tmp_path / "a/b")])
    second = points.claim([str(tmp_path / "a/b")])
    assert (tmp_path / "a/b").is_dir()

    points.release(first)
    assert (tmp_path / "a/b").is_dir(), "still used by the second pod"
    points.release(second)
    assert not (tmp_path / "a").exists()
