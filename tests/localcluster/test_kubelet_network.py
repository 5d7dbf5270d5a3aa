"""Pod networking: DNS names from hostname/subdomain, pod-to-pod TCP, S3 and torch gloo in pods."""

from __future__ import annotations

import textwrap

import boto3
import pytest
from cluster_tools import Cluster, pod_manifest

SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 8080)); s.listen()
    conn, _ = s.accept(); conn.sendall(b"hello from " + socket.gethostname().encode()); conn.close()
""")
CLIENT = textwrap.dedent("""
    import socket, time
    own = socket.socket(); own.bind(("0.0.0.0", 8080))  # the same port as the server pod
    for _ in range(300):
        try:
            c = socket.create_connection(("server.net-test", 8080), timeout=2); break
        except OSError:
            time.sleep(0.1)
    print(c.recv(100).decode())
    print("fqdn", socket.gethostbyname("server.net-test.default.svc.cluster.local"))
""")


def _headless_service(name: str, selector: dict[str, str], port: int) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": "None", "selector": selector, "ports": [{"name": "p", "port": port}]},
    }


def _labelled(pod: dict, labels: dict[str, str]) -> dict:
    pod["metadata"]["labels"] = labels
    return pod


def test_pod_reaches_pod_by_dns_name_and_both_bind_one_port(cluster: Cluster) -> None:
    if cluster.cluster.network_mode != "netns":
        pytest.fail("this machine runs tests as root with iproute2: the netns pod network must be used")
    labels = {"app": "net-test"}
    cluster.apply(
        _headless_service("net-test", labels, 8080),
        _labelled(pod_manifest("net-server", ["python", "-c", SERVER], hostname="server", subdomain="net-test"), labels),
        _labelled(pod_manifest("net-client", ["python", "-c", CLIENT], hostname="client", subdomain="net-test"), labels),
    )

    client = cluster.wait_phase("net-client", {"Succeeded", "Failed"})
    server = cluster.wait_phase("net-server", {"Succeeded", "Failed"})

    logs = cluster.logs("net-client")
    assert client["status"]["phase"] == "Succeeded", logs
    assert server["status"]["phase"] == "Succeeded", cluster.logs("net-server")
    assert "hello from server" in logs
    assert f"fqdn {server['status']['podIP']}" in logs
    assert server["status"]["podIP"] != client["status"]["podIP"]


def test_pod_uses_the_local_s3_at_its_cluster_endpoint(cluster: Cluster) -> None:
    s3 = boto3.client("s3", endpoint_url=cluster.cluster.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    s3.create_bucket(Bucket="pod-bucket")
    script = textwrap.dedent("""
        import os, boto3
        s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")
        s3.put_object(Bucket="pod-bucket", Key="from-pod.txt", Body=b"written in a pod")
        print(s3.get_object(Bucket="pod-bucket", Key="from-pod.txt")["Body"].read().decode())
    """)
    cluster.apply(pod_manifest("s3-user", ["python", "-c", script], container={"env": [
        {"name": "S3_ENDPOINT", "value": cluster.cluster.s3_cluster_endpoint},
        {"name": "AWS_ACCESS_KEY_ID", "value": "local"},
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "local"},
    ]}))

    done = cluster.wait_phase("s3-user", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Succeeded", cluster.logs("s3-user")
    assert "written in a pod" in cluster.logs("s3-user")
    assert s3.get_object(Bucket="pod-bucket", Key="from-pod.txt")["Body"].read() == b"written in a pod"


ALL_REDUCE = textwrap.dedent("""
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum={value.item():.0f}", flush=True)
    dist.destroy_process_group()
""")


def test_torchrun_gloo_all_reduce_across_two_pods(cluster: Cluster) -> None:
    labels = {"app": "gloo"}
    objects: list[dict] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gloo-script", "namespace": "default"},
         "data": {"all_reduce.py": ALL_REDUCE}},
        _headless_service("gloo-workers", labels, 29500),
    ]
    for rank in (0, 1):
        command = ["torchrun", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                   "--master-addr=gloo-worker-0.gloo-workers", "--master-port=29500",
                   "/scripts/all_reduce.py"]
        # Shaped like the operator's worker pods: restricted securityContext (ignored locally),
        # a read-only configMap volume and an emptyDir over /tmp (torchrun writes there).
        objects.append(_labelled(pod_manifest(
            f"gloo-worker-{rank}", command, hostname=f"gloo-worker-{rank}", subdomain="gloo-workers",
            securityContext={"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            container={"env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                       "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                       "volumeMounts": [{"name": "scripts", "mountPath": "/scripts", "readOnly": True},
                                        {"name": "workdir", "mountPath": "/tmp"}]},
            volumes=[{"name": "scripts", "configMap": {"name": "gloo-script"}}, {"name": "workdir", "emptyDir": {}}],
        ), labels))
    cluster.apply(*objects)

    for rank in (0, 1):
        done = cluster.wait_phase(f"gloo-worker-{rank}", {"Succeeded", "Failed"})
        logs = cluster.logs(f"gloo-worker-{rank}")
        assert done["status"]["phase"] == "Succeeded", logs
        assert f"rank {rank} of 2: sum=3" in logs


def test_loopback_fallback_gives_each_pod_an_address_and_dns(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from kubetune.localcluster.cluster import LocalCluster

    labels = {"app": "net-test"}
    server = SERVER.replace("8080", "18080")
    client = CLIENT.replace("8080", "18080").replace('own = socket.socket(); own.bind(("0.0.0.0", 18080))', "")
    with caplog.at_level("WARNING"), LocalCluster(state_dir=tmp_path, network="loopback") as local:
        loopback = Cluster(local)
        loopback.apply(
            _labelled(pod_manifest("net-server", ["python", "-c", server], hostname="server", subdomain="net-test"), labels),
            _labelled(pod_manifest("net-client", ["python", "-c", client], hostname="client", subdomain="net-test"), labels),
        )
        done = loopback.wait_phase("net-client", {"Succeeded", "Failed"})
        logs = loopback.logs("net-client")

    assert done["status"]["phase"] == "Succeeded", logs
    assert "hello from server" in logs
    assert done["status"]["podIP"].startswith("127.0.")
    assert "loopback fallback" in caplog.text and "network isolation" in caplog.text
