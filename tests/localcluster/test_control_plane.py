"""The local cluster is real Kubernetes: what kubectl, Helm and controllers rely on works as on
any cluster, because the API server, controllers and scheduler are the official ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from cluster_tools import Cluster, pod_manifest, wait_for

CHARTS = Path(__file__).parent / "charts"


def _namespace(cluster: Cluster, name: str, labels: dict[str, str] | None = None) -> str:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}
    cluster.apply(body)
    # Pods are refused until the namespace's default ServiceAccount exists.
    wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
             f"namespace {name}'s default service account")
    return name


def test_kubectl_sees_the_real_api_groups_and_a_ready_node(cluster: Cluster) -> None:
    groups = {line.split()[-3] for line in cluster.kubectl("api-resources", "--no-headers").stdout.splitlines()}
    for group in ("apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "networking.k8s.io/v1",
                  "storage.k8s.io/v1", "discovery.k8s.io/v1", "authorization.k8s.io/v1", "events.k8s.io/v1",
                  "coordination.k8s.io/v1", "apiextensions.k8s.io/v1"):
        assert group in groups, f"{group} not served"
    node = json.loads(cluster.kubectl("get", "node", "kubetune-local", "-o", "json").stdout)
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    assert int(node["status"]["capacity"]["cpu"]) >= 1 and node["status"]["capacity"]["memory"].endswith("Ki")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == cluster.cluster.version
    lease = json.loads(cluster.kubectl("get", "lease", "kubetune-local", "-n", "kube-node-lease", "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == "kubetune-local"


def test_server_side_apply_tracks_field_managers(cluster: Cluster) -> None:
    def config_map(data: dict[str, str]) -> str:
        return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": {"name": "ssa", "namespace": "default"}, "data": data})

    cluster.kubectl("apply", "--server-side", "--field-manager=alice", "-f", "-", input=config_map({"a": "1", "b": "2"}))
    applied = json.loads(cluster.kubectl("get", "cm", "ssa", "-o", "json", "--show-managed-fields").stdout)
    assert [m["manager"] for m in applied["metadata"]["managedFields"]] == ["alice"]

    conflict = cluster.kubectl("apply", "--server-side", "--field-manager=bob", "-f", "-",
                               input=config_map({"a": "changed"}), check=False)
    assert conflict.returncode != 0 and "conflict" in conflict.stderr.lower() and "alice" in conflict.stderr
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=bob", "-f", "-",
                    input=config_map({"a": "changed"}))
    # alice stops applying b: the field she alone managed goes away.
    cluster.kubectl("apply", "--server-side", "--field-manager=alice", "-f", "-", input=config_map({}))
    data = json.loads(cluster.kubectl("get", "cm", "ssa", "-o", "json").stdout)["data"]
    assert data == {"a": "changed"}


def test_built_in_kinds_are_validated_and_defaulted(cluster: Cluster) -> None:
    empty = pod_manifest("no-containers", ["true"])
    empty["spec"]["containers"] = []
    refused = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(empty), check=False)
    assert refused.returncode != 0 and "spec.containers: Required value" in refused.stderr

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "plain", "namespace": "default"},
               "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]}}
    cluster.apply(service)
    created = json.loads(cluster.kubectl("get", "svc", "plain", "-o", "json").stdout)
    assert created["spec"]["clusterIP"] not in ("", "None")
    assert created["spec"]["ports"][0]["protocol"] == "TCP"


def test_authorization_is_rbac_and_node_authorizer(cluster: Cluster) -> None:
    def can_i(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", *args, check=False).stdout.strip()

    assert can_i("create", "deployments") == "yes"  # the admin kubeconfig
    assert can_i("list", "secrets", "--as=system:serviceaccount:default:default") == "no"
    # The node agent's own identity: it may not read a Secret no pod of its node refers to.
    assert can_i("get", "secrets/anything", "--as=system:node:kubetune-local", "--as-group=system:nodes") == (
        "no - node: no relationship found between node 'kubetune-local' and this object")
    assert can_i("get", "nodes/kubetune-local", "--as=system:node:kubetune-local",
                 "--as-group=system:nodes") == "yes"


def test_pod_security_admission_refuses_what_breaks_the_restricted_profile(cluster: Cluster) -> None:
    namespace = _namespace(cluster, "restricted", {"pod-security.kubernetes.io/enforce": "restricted"})
    loose = pod_manifest("loose", ["sleep", "1"])
    loose["metadata"]["namespace"] = namespace
    refused = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(loose), check=False)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr

    strict = pod_manifest(
        "strict", ["sh", "-c", "echo complies"],
        securityContext={"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        container={"securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}},
    )
    strict["metadata"]["namespace"] = namespace
    cluster.apply(strict)
    done = cluster.wait_phase("strict", {"Succeeded", "Failed"}, namespace=namespace)
    assert done["status"]["phase"] == "Succeeded"
    # What local mode cannot apply is said on the pod, not silently dropped.
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=strict",
                             "-o", "json").stdout
    differences = [e["message"] for e in json.loads(events)["items"] if e["reason"] == "LocalModeDifference"]
    assert differences and "runAsUser 1000" in differences[0] and "runAsNonRoot" in differences[0]


def test_a_pod_that_cannot_fit_stays_pending_with_the_schedulers_reason(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("too-big", ["true"], container={"resources": {"requests": {"cpu": "1000"}}}))

    def unschedulable() -> dict | None:
        conditions = cluster.pod("too-big").get("status", {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    condition = wait_for(unschedulable, "the scheduler to mark too-big unschedulable")
    assert condition["reason"] == "Unschedulable" and "Insufficient cpu" in condition["message"]
    assert cluster.pod("too-big")["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", "too-big", "--wait=false")


def test_graceful_deletion_sends_sigterm_then_sigkill_after_the_grace_period(cluster: Cluster) -> None:
    # Both ignore SIGTERM: only the SIGKILL at the end of the 3 s grace period stops them. As a
    # container runtime does, SIGTERM goes to the container's first process only (a launcher
    # passes it on itself); the SIGKILL takes every process of the container.
    child = "trap 'echo child got SIGTERM' TERM; while sleep 0.1; do :; done"
    script = (f"sh -c \"{child}\" & trap 'echo got SIGTERM' TERM; echo started; "
              "while true; do sleep 0.1; done")
    cluster.apply(pod_manifest("stubborn", ["sh", "-c", script], terminationGracePeriodSeconds=3))
    cluster.wait_phase("stubborn", {"Running"})
    wait_for(lambda: "started" in cluster.logs("stubborn"), "the container to start")
    assert len(_pids_running(child)) >= 2  # the container's shell and its child

    started = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "--wait=false")
    terminating = cluster.pod("stubborn")
    assert terminating["metadata"]["deletionTimestamp"] and terminating["metadata"]["deletionGracePeriodSeconds"] == 3
    wait_for(lambda: "got SIGTERM" in cluster.logs("stubborn"), "SIGTERM to reach the container")
    time.sleep(0.5)
    assert "child got SIGTERM" not in cluster.logs("stubborn")
    wait_for(lambda: cluster.kubectl("get", "pod", "stubborn", check=False).returncode != 0,
             "the pod to be deleted for good")
    assert time.monotonic() - started >= 3.0
    assert not _pids_running(child)


def _pids_running(command_part: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and command_part.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_deployment_runs_and_garbage_collection_removes_its_pods(cluster: Cluster) -> None:
    cluster.kubectl("create", "deployment", "sleepers", "--image=ignored", "--replicas=2", "--", "sleep", "600")
    cluster.kubectl("rollout", "status", "deployment/sleepers", "--timeout=90s")
    pods = json.loads(cluster.kubectl("get", "pods", "-l", "app=sleepers", "-o", "json").stdout)["items"]
    assert len(pods) == 2 and all(p["status"]["phase"] == "Running" for p in pods)

    cluster.kubectl("delete", "deployment", "sleepers", "--wait=false")
    # The garbage collector deletes the ReplicaSet, then its pods, asynchronously.
    wait_for(lambda: not json.loads(cluster.kubectl("get", "pods", "-l", "app=sleepers", "-o", "json").stdout)["items"],
             "the deployment's pods to be garbage-collected")


def test_helm_installs_a_chart_whose_pod_talks_to_the_api_as_its_service_account(cluster: Cluster) -> None:
    import helm_python as helm

    namespace = _namespace(cluster, "helm-test")
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible", "namespace": namespace},
                   "data": {"k": "v"}})
    config = helm.Config(kubeconfig_path=str(cluster.cluster.kubeconfig), namespace=namespace)
    release = config.install(str(CHARTS / "whoami"), "whoami", namespace=namespace, wait="watcher", timeout=120)
    assert release["status"] == "deployed"  # helm waited for the Deployment to be ready

    def answered() -> str | None:
        logs = cluster.kubectl("logs", "deployment/whoami", "-n", namespace, check=False).stdout
        return logs if "secrets:" in logs else None

    logs = wait_for(answered, "the whoami pod to ask the API")
    assert f"I am system:serviceaccount:{namespace}:whoami" in logs
    assert "visible" in logs.split("configmaps:")[1].splitlines()[0]
    assert "secrets: 403" in logs  # its Role grants configmaps only

    config.uninstall("whoami", wait="watcher", timeout=120)
    assert cluster.kubectl("get", "deployment", "whoami", "-n", namespace, check=False).returncode != 0


def test_kubectl_logs_options_work_through_the_api_server(cluster: Cluster) -> None:
    # stdout and stderr are separate pipes, as under containerd: only time orders them.
    script = "echo one; sleep 1.2; echo two; sleep 0.3; echo to-stderr >&2; sleep 0.3; echo three; exit 1"
    cluster.apply(pod_manifest("talker", ["sh", "-c", script], restartPolicy="OnFailure"))

    def restarted() -> dict | None:
        status = (cluster.pod("talker").get("status", {}).get("containerStatuses") or [{}])[0]
        return status if status.get("restartCount", 0) >= 1 else None

    wait_for(restarted, "talker to fail once and restart")
    previous = cluster.kubectl("logs", "talker", "--previous").stdout
    assert previous.splitlines() == ["one", "two", "to-stderr", "three"]
    assert cluster.kubectl("logs", "talker", "--previous", "--tail=2").stdout.splitlines() == ["to-stderr", "three"]
    assert cluster.kubectl("logs", "talker", "--previous", "--limit-bytes=6").stdout == "one\ntw"
    stamped = cluster.kubectl("logs", "talker", "--previous", "--timestamps").stdout.splitlines()
    first, last = (line.split(" ", 1)[0] for line in (stamped[0], stamped[-1]))
    assert stamped[0].endswith(" one") and first.endswith("Z") and last > first
    cluster.kubectl("delete", "pod", "talker", "--wait=false")


def test_kubectl_logs_since_leaves_out_older_lines(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("slow-talker", ["sh", "-c", "echo early; sleep 4; echo late; sleep 600"]))
    wait_for(lambda: "late" in cluster.logs("slow-talker"), "the late line")
    assert cluster.kubectl("logs", "slow-talker", "--since=2s").stdout.splitlines() == ["late"]
    cluster.kubectl("delete", "pod", "slow-talker", "--wait=false")


def test_exec_is_refused_with_a_message_that_says_why(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("no-exec", ["sleep", "600"]))
    cluster.wait_phase("no-exec", {"Running"})
    refused = cluster.kubectl("exec", "no-exec", "--", "true", check=False)
    assert refused.returncode != 0 and "not supported by the kubetune local node" in refused.stderr
    cluster.kubectl("delete", "pod", "no-exec", "--wait=false")


def test_every_container_of_a_pod_runs(cluster: Cluster) -> None:
    pod = pod_manifest("two-containers", ["sh", "-c", "echo first says hi"])
    pod["spec"]["containers"].append({"name": "second", "image": "ignored", "command": ["sh", "-c", "echo second; exit 3"]})
    cluster.apply(pod)
    done = cluster.wait_phase("two-containers", {"Succeeded", "Failed"})
    codes = {s["name"]: s["state"]["terminated"]["exitCode"] for s in done["status"]["containerStatuses"]}
    assert (done["status"]["phase"], codes) == ("Failed", {"main": 0, "second": 3})
    assert cluster.kubectl("logs", "two-containers", "-c", "second").stdout == "second\n"


def test_projected_service_account_token_reaches_the_pod(cluster: Cluster) -> None:
    script = ("cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; "
              "head -c 20 /var/run/secrets/kubernetes.io/serviceaccount/ca.crt; echo; "
              "wc -c < /var/run/secrets/kubernetes.io/serviceaccount/token")
    cluster.apply(pod_manifest("token-reader", ["sh", "-c", script]))
    done = cluster.wait_phase("token-reader", {"Succeeded", "Failed"})
    lines = cluster.logs("token-reader").splitlines()
    assert done["status"]["phase"] == "Succeeded", lines
    assert lines[0] == "default" and lines[1] == "-----BEGIN CERTIFICA" and int(lines[2]) > 100


def test_active_deadline_fails_a_pod_that_runs_too_long(cluster: Cluster) -> None:
    cluster.apply(pod_manifest("overdue", ["sleep", "600"], activeDeadlineSeconds=2))
    done = cluster.wait_phase("overdue", {"Succeeded", "Failed"})
    assert (done["status"]["phase"], done["status"]["reason"]) == ("Failed", "DeadlineExceeded")
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143  # SIGTERM
