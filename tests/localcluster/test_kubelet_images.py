"""Images: the local node runs only the repositories it knows, and shows any other image as a
real kubelet does: ErrImagePull, then ImagePullBackOff, the container never started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cluster_tools import Cluster, pod_manifest, wait_for

from kubetune.api.spec import DEFAULT_TRAINER_IMAGE
from kubetune.localcluster.kubelet.images import InvalidImageName, LocalImages, parse

CHARTS = Path(__file__).parent / "charts"
DIGEST = "sha256:" + "0" * 64


# -- the matching rule -----------------------------------------------------------------------
@pytest.mark.parametrize(("one", "other"), [
    ("busybox", "docker.io/library/busybox:1.36"),
    ("busybox:1.36", "index.docker.io/library/busybox@" + DIGEST),
    ("kubetune/trainer", "docker.io/kubetune/trainer:0.1.0"),
    ("registry.example/whoami:1.0", "registry.example/whoami@" + DIGEST),
    ("localhost:5000/team/app:v1", "localhost:5000/team/app:v2"),
])
def test_tag_digest_and_default_registry_do_not_make_another_repository(one: str, other: str) -> None:
    assert parse(one).repository == parse(other).repository


@pytest.mark.parametrize(("one", "other"), [
    ("kubetune/trainer", "ghcr.io/x/kubetune-trainer"),
    ("kubetune/trainer", "ghcr.io/kubetune/trainer"),  # same path, another registry
    ("busybox", "library/busybox/extra"),
    ("localhost/app", "localhost:5000/app"),
])
def test_another_registry_or_path_is_another_repository(one: str, other: str) -> None:
    assert parse(one).repository != parse(other).repository


@pytest.mark.parametrize("image", ["Busybox", "busybox:", "busy box", "a" * 64, "busybox@sha256:short"])
def test_what_the_kubelet_cannot_parse_is_an_invalid_image_name(image: str) -> None:
    with pytest.raises(InvalidImageName):
        parse(image)


def test_the_default_images_cover_the_trainer_and_what_the_tests_run() -> None:
    images = LocalImages()
    chart_image = yaml.safe_load((CHARTS / "whoami" / "values.yaml").read_text())["image"]
    helper_image = pod_manifest("x", [])["spec"]["containers"][0]["image"]
    for image in (DEFAULT_TRAINER_IMAGE, "kubetune/operator:0.1.0", helper_image, "ignored", chart_image):
        assert images.ensure(image, "IfNotPresent") is None, image


def test_unknown_images_fail_in_the_kubelets_words() -> None:
    images = LocalImages(["busybox"])
    assert images.ensure("docker.io/library/busybox:1.36", "Always") is None
    assert images.ensure("ignored", "Never") is None  # present, so Never is fine

    pull = images.ensure("ghcr.io/x/kubetune-trainer", "IfNotPresent")
    assert pull is not None and pull.reason == "ErrImagePull"
    assert pull.message.startswith('failed to resolve reference "ghcr.io/x/kubetune-trainer:latest": '
                                   "repository ghcr.io/x/kubetune-trainer is not one the kubetune local node runs")
    assert "busybox, ignored, kubetune/operator, kubetune/trainer" in pull.message
    assert pull.message.endswith("add one with `kubetune local up --image REPOSITORY`")
    assert pull.backoff_message == 'Back-off pulling image "ghcr.io/x/kubetune-trainer:latest"'

    never = images.ensure("nginx:1.27", "Never")
    assert never is not None and (never.reason, never.message) == (
        "ErrImageNeverPull", 'Container image "nginx:1.27" is not present with pull policy of Never')

    invalid = images.ensure("Nginx", None)
    assert invalid is not None and invalid.reason == "InvalidImageName"
    assert invalid.message.startswith('Failed to apply default image tag "Nginx": couldn\'t parse image name "Nginx"')


def test_a_configured_image_must_be_a_valid_reference() -> None:
    assert "localhost:5000/team/app" in LocalImages(["localhost:5000/team/app:v1"]).names()
    with pytest.raises(InvalidImageName):
        LocalImages(["Team/App"])


# -- on the node -----------------------------------------------------------------------------
def _waiting(cluster: Cluster, pod: str, reason: str, key: str = "containerStatuses") -> dict | None:
    statuses = cluster.pod(pod).get("status", {}).get(key) or []
    waiting = (statuses[0]["state"].get("waiting") or {}) if statuses else {}
    return waiting if waiting.get("reason") == reason else None


def _events(cluster: Cluster, pod: str) -> set[tuple[str, str, str]]:
    listed = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={pod}", "-o", "json").stdout
    return {(e["type"], e["reason"], e["message"]) for e in json.loads(listed)["items"]}


def test_an_image_the_node_does_not_run_backs_off_and_never_starts(cluster: Cluster) -> None:
    image = "ghcr.io/x/kubetune-trainer:1.0"
    cluster.apply(pod_manifest("foreign", ["sh", "-c", "echo must not run"], container={"image": image}))

    pulling = wait_for(lambda: _waiting(cluster, "foreign", "ErrImagePull"), "ErrImagePull")
    names_it = f'failed to resolve reference "{image}": repository ghcr.io/x/kubetune-trainer '
    assert pulling["message"].startswith(names_it)
    assert "kubetune/trainer" in pulling["message"] and "kubetune local up --image" in pulling["message"]
    backing_off = wait_for(lambda: _waiting(cluster, "foreign", "ImagePullBackOff"), "ImagePullBackOff")
    assert backing_off["message"] == f'Back-off pulling image "{image}": ErrImagePull: {pulling["message"]}'

    pod = cluster.pod("foreign")
    status = pod["status"]["containerStatuses"][0]
    assert pod["status"]["phase"] == "Pending"
    assert (status["restartCount"], status["ready"], status["started"]) == (0, False, False)
    assert "containerID" not in status and status["lastState"] == {}
    expected = {("Normal", "Pulling", f'Pulling image "{image}"'),
                ("Warning", "Failed", f'Failed to pull image "{image}": {pulling["message"]}'),
                ("Warning", "Failed", "Error: ErrImagePull"),
                ("Normal", "BackOff", f'Back-off pulling image "{image}"'),
                ("Warning", "Failed", "Error: ImagePullBackOff")}
    wait_for(lambda: expected <= _events(cluster, "foreign"), "the kubelet's image events")
    # No logs, but the kubelet's reason (which of the two depends on the moment).
    logs = cluster.kubectl("logs", "foreign", check=False)
    assert logs.returncode != 0 and 'container "main" in pod "foreign" is waiting to start' in logs.stderr
    assert "image can't be pulled" in logs.stderr or "trying and failing to pull image" in logs.stderr

    cluster.kubectl("delete", "pod", "foreign", "--timeout=30s")  # waits until it is gone


def test_an_init_container_image_the_node_does_not_run_holds_the_pod_in_init(cluster: Cluster) -> None:
    cluster.apply(pod_manifest(
        "foreign-init", ["sh", "-c", "echo main must not run"],
        initContainers=[{"name": "fetch", "image": "busybox:1.36", "command": ["true"]}],
    ))

    wait_for(lambda: _waiting(cluster, "foreign-init", "ImagePullBackOff", "initContainerStatuses"),
             "the init container's ImagePullBackOff")
    pod = cluster.pod("foreign-init")
    assert pod["status"]["phase"] == "Pending"
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing"
    row = cluster.kubectl("get", "pod", "foreign-init", "--no-headers").stdout
    assert "Init:ErrImagePull" in row or "Init:ImagePullBackOff" in row
    cluster.kubectl("delete", "pod", "foreign-init", "--timeout=30s")


def test_invalid_names_and_never_pull_wait_with_their_own_reasons(cluster: Cluster) -> None:
    pod = pod_manifest("unpullable", ["true"], container={"image": "Busybox"})
    never = {"name": "never", "image": "busybox", "imagePullPolicy": "Never", "command": ["true"]}
    pod["spec"]["containers"].append(never)
    cluster.apply(pod)

    def reasons() -> dict[str, str] | None:
        statuses = cluster.pod("unpullable").get("status", {}).get("containerStatuses") or []
        found = {s["name"]: (s["state"].get("waiting") or {}).get("reason") for s in statuses}
        return found if found == {"main": "InvalidImageName", "never": "ErrImageNeverPull"} else None

    wait_for(reasons, "InvalidImageName and ErrImageNeverPull")
    assert cluster.pod("unpullable")["status"]["phase"] == "Pending"
    wait_for(lambda: ("Warning", "Failed", "Error: InvalidImageName") in _events(cluster, "unpullable"),
             "the InvalidImageName event")
    cluster.kubectl("delete", "pod", "unpullable", "--timeout=30s")


def test_any_tag_or_digest_of_a_known_repository_runs(cluster: Cluster) -> None:
    init = {"name": "init", "image": "index.docker.io/library/ignored:v2", "command": ["true"]}
    pod = pod_manifest("known-images", ["true"], container={"image": f"docker.io/kubetune/trainer@{DIGEST}"},
                       initContainers=[init])
    cluster.apply(pod)

    done = cluster.wait_phase("known-images", {"Succeeded", "Failed"})

    assert done["status"]["phase"] == "Succeeded"
