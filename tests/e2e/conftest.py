"""One local cluster, S3 and operator for every end-to-end test of the session: starting them
takes about 20 seconds, and each test's jobs have names of their own."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).parent))  # e2e_tools
sys.path.insert(0, str(Path(__file__).parent.parent / "chaos"))  # the chaos table: row 8 is scanned here

from e2e_tools import REPO, long_job, published  # noqa: E402

from kubetune.cli.demo import (  # noqa: E402
    DEMO_ACCESS_KEY, DEMO_SECRET_KEY, Kubectl, create_credentials_secret, follow_job, install_crd, local_cluster,
    running_operator, upload_demo_data,
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    with local_cluster(state) as cluster:
        kubectl = Kubectl(cluster.kubeconfig)
        upload_demo_data(cluster.s3_endpoint)
        install_crd(kubectl, REPO)
        create_credentials_secret(kubectl)
        s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=DEMO_ACCESS_KEY, aws_secret_access_key=DEMO_SECRET_KEY,
                          config=Config(s3={"addressing_style": "path"}))
        with running_operator(cluster, state / "operator.log") as operator:
            yield SimpleNamespace(cluster=cluster, kubectl=kubectl, s3=s3, state=state, operator=operator)


@pytest.fixture(scope="session")
def uninterrupted(stack) -> dict:
    """The published results of the long job run without interruption: what a restarted run
    must reproduce."""
    stack.kubectl.run("apply", "-f", "-", input=long_job("uninterrupted"))
    status = follow_job(stack.kubectl, "uninterrupted", timeout=600, echo=False)["status"]
    assert status["phase"] == "Succeeded", status
    return published(stack.s3, "uninterrupted")["results"]
