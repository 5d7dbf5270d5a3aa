"""One local cluster (real control plane, our node, S3) shared by the tests of this folder."""

from __future__ import annotations

from typing import Iterator

import pytest
from cluster_tools import Cluster

from kubetune.localcluster.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with LocalCluster(state_dir=tmp_path_factory.mktemp("cluster")) as local:
        yield Cluster(local)
