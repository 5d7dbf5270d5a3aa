"""The local kubelet runs pods like a kubelet: env, volumes, phases, restarts, logs, deletion."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

from cluster_tools import Cluster, container_pid, pid_alive, pod_manifest, wait_for

from kubetune.localcluster import network


def _secret(name: str, data: dict[str, str]) -> dict:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"}, "data": encoded}


def _configmap(name: str, data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}, "data": data}


def test_pod_sees_env_and_volumes_and_succeeds(cluster: Cluster) -> None:
    script = (
        "echo GREETING=$GREETING TOKEN=$TOKEN NAME=$POD_NAME NS=$POD_NAMESPACE IP=$POD_IP FROM=$FROM_cm; "
        "echo OPTIONAL=${MISSING_OPTIONAL:-unset}; "
        "echo CONFIG=$(cat /etc/app/greeting); echo SECRET=$(cat /etc/creds/renamed/token); "
        "echo MODE=$(stat -c %a /etc/creds/renamed/token); echo PWD=$(pwd); echo HOST=$(hostname); "
        "echo scratch > /scratch/file && echo SCRATCH=$(cat /scratch/file)"
    )
    pod = pod_manifest(
        "env-and-volumes", ["sh", "-c", script],
        container={
            "workingDir": "/scratch",
            "env": [
                {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "greeting"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "app-creds", "key": "token"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "MISSING_OPTIONAL", "valueFrom": {"configMapKeyRef": {"name": "app-config", "key": "nope", "optional": True}}},
            ],
            "envFrom": [{"configMapRef": {"name": "app-config"}, "prefix": "FROM_"}],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": True},
                {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        volumes=[
            {"name": "config", "configMap": {"name": "app-config"}},
            {"name": "creds", "secret": {"secretName": "app-creds", "defaultMode": 0o400,
                                          "items": [{"key": "token", "path": "renamed/token"}]}},
            {"name": "scratch", "emptyDir": {}},
        ],
    )
    created_on_host = [Path("/etc/app"), Path("/etc/creds"), Path("/scratch")]
    assert not any(p.exists() for p in created_on_host), "this test needs these paths free"
    cluster.apply(_configmap("app-config", {"greeting": "hello", "cm": "from-envfrom"}),
                  _secret("app-creds", {"token": "s3cret"}), pod)

    done = cluster.wait_phase("env-and-volumes", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Succeeded", cluster.logs("env-and-volumes")
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    ip = done["status"]["podIP"]
    logs = cluster.logs("env-and-volumes")
    assert f"GREETING=hello TOKEN=s3cret NAME=env-and-volumes NS=default IP={ip} FROM=from-envfrom" in logs
    for line in ("OPTIONAL=unset", "CONFIG=hello", "SECRET=s3cret", "MODE=400", "PWD=/scratch",
                 "HOST=env-and-volumes", "SCRATCH=scratch"):
        assert line in logs
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True" and conditions["Ready"] == "False"
    assert done["spec"]["nodeName"] == "kubetune-local"
    # mountPaths the kubelet had to create on the host go away with the pod's process.
    wait_for(lambda: not any(p.exists() for p in created_on_host), "created mount points to be removed")


def test_failing_command_fails_the_pod_with_its_exit_code(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("fails", ["sh", "-c", "echo about to fail; exit 3"]))

    done = cluster.wait_phase("fails", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Failed"
    terminated = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert "about to fail" in cluster.logs("fails")


def test_a_container_killed_by_a_signal_reports_128_plus_n_and_error(cluster: Cluster) -> None:
    # What containerd reports: exit code 128+N, reason Error (OOMKilled only for an OOM kill),
    # and no `signal` field, which a real kubelet never fills in.
    # "$$$$": Kubernetes expands "$$" in a command to "$", so the shell sees its own pid, "$$".
    pod = pod_manifest("killed", ["sh", "-c", "kill -KILL $$$$"])
    pod["spec"]["containers"].append({"name": "segv", "image": "ignored", "command": ["sh", "-c", "kill -SEGV $$$$"]})
    cluster.apply(pod)

    done = cluster.wait_phase("killed", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Failed"
    terminated = {s["name"]: s["state"]["terminated"] for s in done["status"]["containerStatuses"]}
    assert {name: (t["exitCode"], t["reason"]) for name, t in terminated.items()} == {
        "main": (137, "Error"), "segv": (139, "Error")}
    assert not any("signal" in t for t in terminated.values())


def test_on_failure_restarts_until_success(cluster: Cluster) -> None:
    # Fails on the first run, succeeds on the second: emptyDir survives container restarts.
    script = "if [ -f /state/ran ]; then echo second run; exit 0; fi; touch /state/ran; exit 1"
    cluster.apply(pod_manifest(
        "retries", ["sh", "-c", script], restartPolicy="OnFailure",
        container={"volumeMounts": [{"name": "state", "mountPath": "/state"}]},
        volumes=[{"name": "state", "emptyDir": {}}],
    ))

    done = cluster.wait_phase("retries", {"Succeeded", "Failed"})

    status = done["status"]["containerStatuses"][0]
    assert done["status"]["phase"] == "Succeeded"
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert "second run" in cluster.logs("retries")


def test_missing_secret_waits_with_config_error_then_runs(cluster: Cluster) -> None:
    cluster.apply(pod_manifest(
        "needs-secret", ["sh", "-c", "echo KEY=$KEY"],
        container={"env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "key"}}}]},
    ))

    def waiting_reason() -> dict | None:
        statuses = cluster.pod("needs-secret").get("status", {}).get("containerStatuses") or []
        waiting = statuses[0]["state"].get("waiting") if statuses else None
        return waiting if waiting and waiting["reason"] == "CreateContainerConfigError" else None

    waiting = wait_for(waiting_reason, "CreateContainerConfigError")
    assert "late-secret" in waiting["message"]
    assert cluster.pod("needs-secret")["status"]["phase"] == "Pending"

    cluster.apply(_secret("late-secret", {"key": "arrived"}))
    done = cluster.wait_phase("needs-secret", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Succeeded"
    assert "KEY=arrived" in cluster.logs("needs-secret")


def test_deleting_a_running_pod_kills_its_process_and_network(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("sleeper", ["sleep", "600"], terminationGracePeriodSeconds=2))
    running = cluster.wait_phase("sleeper", {"Running"})
    pid = container_pid(running)
    assert pid_alive(pid)
    namespaces_before, _ = network.list_leftovers(cluster.cluster.prefix)

    table = cluster.kubectl("get", "pods", "-o", "wide").stdout
    sleeper_row = next(line for line in table.splitlines() if line.startswith("sleeper "))
    assert "Running" in sleeper_row and running["status"]["podIP"] in sleeper_row

    cluster.kubectl("delete", "pod", "sleeper", "--wait=false")

    wait_for(lambda: not pid_alive(pid), f"pid {pid} of the deleted pod to exit")
    wait_for(
        lambda: len(network.list_leftovers(cluster.cluster.prefix)[0]) == len(namespaces_before) - 1,
        "the deleted pod's network namespace to be removed",
    )


def test_kubectl_logs_follow_streams_until_the_container_exits(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("chatty", ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.5; done"]))
    cluster.wait_phase("chatty", {"Running", "Succeeded"})

    followed = cluster.kubectl("logs", "-f", "chatty").stdout

    assert followed.splitlines() == ["line 1", "line 2", "line 3"]


def test_init_containers_run_first_and_share_volumes(cluster: Cluster) -> None:
    cluster.apply(pod_manifest(
        "with-init", ["sh", "-c", "echo main sees $(cat /shared/prepared)"],
        initContainers=[{"name": "prepare", "image": "ignored", "command": ["sh", "-c", "echo ready > /shared/prepared; echo init done"],
                         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
        container={"volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        volumes=[{"name": "shared", "emptyDir": {}}],
    ))

    done = cluster.wait_phase("with-init", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Succeeded", cluster.logs("with-init")
    init = done["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["exitCode"] == 0 and init["ready"] is True
    assert "main sees ready" in cluster.kubectl("logs", "with-init", "-c", "main").stdout


def test_failed_init_container_fails_a_never_restart_pod(cluster: Cluster) -> None:
    cluster.apply(pod_manifest(
        "bad-init", ["sh", "-c", "echo main must not run"],
        initContainers=[{"name": "check", "image": "ignored", "command": ["sh", "-c", "exit 4"]}],
    ))

    done = cluster.wait_phase("bad-init", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Failed"
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert "waiting" in done["status"]["containerStatuses"][0]["state"]


def test_a_volume_over_the_python_environment_does_not_hide_it(cluster: Cluster) -> None:
    # The local "image" is this machine: an emptyDir at /tmp (as the operator's workers have)
    # must not hide a virtualenv or checkout that happens to live under it (a clone in /tmp).
    top = "/" + Path(sys.prefix).parts[1]
    script = "python -c 'import kubetune.api.trainer_config, sys; print(\"IMPORTED from\", sys.prefix)'; ls -A " + top
    cluster.apply(pod_manifest(
        "volume-over-venv", ["sh", "-c", script],
        container={"volumeMounts": [{"name": "scratch", "mountPath": top}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
    ))

    done = cluster.wait_phase("volume-over-venv", {"Succeeded", "Failed"})

    logs = cluster.logs("volume-over-venv")
    assert done["status"]["phase"] == "Succeeded", logs
    assert f"IMPORTED from {sys.prefix}" in logs
    # Only the environment comes back on top of the volume, not the rest of the host folder.
    listed = set(logs.split("IMPORTED from", 1)[1].split()[1:])
    assert listed == {Path(sys.prefix).parts[2]} | {Path(p).parts[2] for p in network.image_paths()
                                                   if p.startswith(top + "/")}
