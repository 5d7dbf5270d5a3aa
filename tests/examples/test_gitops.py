"""examples/gitops: the Argo CD and Flux manifests point at what this repository holds, the job
they sync is valid, the Argo CD health check (Lua, run with lupa's Lua 5.1 as Argo CD's
gopher-lua is) reads the statuses the real reconciler writes, and what the README promises a
GitOps user about applying FineTuneJobs holds on the real API server."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "api"))  # crd_tools: the committed CRD, its schema and CEL

from crd_tools import cel_failures, load_crd, schema_error_fields  # noqa: E402

from kubetune.api import JobRef, parse_spec  # noqa: E402
from kubetune.api.termination import ExitCode, TerminationMessage  # noqa: E402
from kubetune.operator.reconcile import Create, Delete, Job, Outcome, reconcile  # noqa: E402
from kubetune.operator.settings import OperatorSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GITOPS = REPO / "examples" / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "finetunejob-health.lua"
HEALTH_KEY = "resource.customizations.health.kubetune.dev_FineTuneJob"

EXPECTED_KINDS = {
    "argocd/kubetune-chart.yaml": [("argoproj.io/v1alpha1", "Application")],
    "argocd/finetunejobs.yaml": [("argoproj.io/v1alpha1", "Application")],
    "argocd/argocd-cm-patch.yaml": [("v1", "ConfigMap")],
    "flux/source.yaml": [("source.toolkit.fluxcd.io/v1", "GitRepository")],
    "flux/kubetune-chart.yaml": [("helm.toolkit.fluxcd.io/v2", "HelmRelease")],
    "flux/finetunejobs.yaml": [("v1", "Namespace"), ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")],
    "jobs/kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
    "jobs/support-bot-v1.yaml": [("kubetune.dev/v1alpha1", "FineTuneJob")],
}


def documents(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((GITOPS / relative).read_text()) if doc is not None]


def one(relative: str) -> dict[str, Any]:
    (doc,) = documents(relative)
    return doc


def jobs() -> list[dict[str, Any]]:
    return [one(f"jobs/{name}") for name in one("jobs/kustomization.yaml")["resources"]]


# -- the manifests --------------------------------------------------------------------------------
def test_every_yaml_file_parses_with_the_expected_kinds() -> None:
    found = {str(path.relative_to(GITOPS)) for path in GITOPS.rglob("*.yaml")}
    assert found == set(EXPECTED_KINDS)
    for relative, kinds in EXPECTED_KINDS.items():
        assert [(doc["apiVersion"], doc["kind"]) for doc in documents(relative)] == kinds, relative


def test_the_argocd_chart_application_installs_this_repositorys_chart_server_side() -> None:
    app = one("argocd/kubetune-chart.yaml")["spec"]
    source = app["source"]
    assert (source["repoURL"], source["path"]) == ("https://github.com/kubetune/kubetune", "charts/kubetune")
    chart = REPO / source["path"] / "Chart.yaml"
    assert chart.is_file(), "the Application points at a chart this repository lacks"
    assert source["targetRevision"] == f"v{yaml.safe_load(chart.read_text())['version']}"
    assert app["destination"]["namespace"] == "kubetune-system"
    assert app["syncPolicy"]["syncOptions"] == ["CreateNamespace=true", "ServerSideApply=true"]
    assert app["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}


def test_the_argocd_jobs_application_syncs_the_jobs_folder_without_pruning() -> None:
    app = one("argocd/finetunejobs.yaml")["spec"]
    assert (REPO / app["source"]["path"] / "kustomization.yaml").is_file()
    assert app["source"]["path"] == "examples/gitops/jobs" and app["destination"]["namespace"] == "ml"
    assert app["syncPolicy"]["automated"]["prune"] is False
    assert "ServerSideApply=true" in app["syncPolicy"]["syncOptions"]
    assert not any("Replace=true" in option for option in app["syncPolicy"]["syncOptions"])


def test_flux_installs_the_chart_with_its_crds_and_syncs_the_jobs_without_waiting() -> None:
    source = one("flux/source.yaml")
    release = one("flux/kubetune-chart.yaml")["spec"]
    _, kustomization = documents("flux/finetunejobs.yaml")
    assert release["chart"]["spec"]["chart"] == "charts/kubetune"
    assert (REPO / "charts" / "kubetune" / "Chart.yaml").is_file()
    assert source["spec"]["ref"]["tag"] == one("argocd/kubetune-chart.yaml")["spec"]["source"]["targetRevision"]
    assert release["chart"]["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert release["install"]["crds"] == release["upgrade"]["crds"] == "CreateReplace"
    assert release["targetNamespace"] == "kubetune-system"
    spec = kustomization["spec"]
    assert (REPO / spec["path"] / "kustomization.yaml").is_file()
    assert spec["wait"] is False and spec["prune"] is False and spec["force"] is False
    assert spec["sourceRef"]["name"] == source["metadata"]["name"]


def test_the_jobs_folder_lists_every_job_and_each_is_valid() -> None:
    listed = set(one("jobs/kustomization.yaml")["resources"])
    assert listed == {path.name for path in (GITOPS / "jobs").glob("*.yaml")} - {"kustomization.yaml"}
    for manifest in jobs():
        assert manifest["metadata"]["namespace"] == "ml"
        assert schema_error_fields(manifest) == {}
        assert cel_failures(manifest) == []
        spec = parse_spec(manifest["spec"])
        assert spec.storage.credentials_secret == "s3-credentials"
        assert spec.run_policy.ttl_seconds_after_finished is None  # selfHeal would recreate a deleted job


def test_the_argocd_cm_copy_of_the_health_check_is_the_lua_file() -> None:
    configmap = one("argocd/argocd-cm-patch.yaml")
    assert (configmap["metadata"]["name"], configmap["metadata"]["namespace"]) == ("argocd-cm", "argocd")
    assert configmap["data"][HEALTH_KEY] == HEALTH_LUA.read_text()


# -- the health check against the reconciler's statuses ------------------------------------------
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Life:
    """One FineTuneJob as the operator sees it: the manifest from Git, the stored status, and its
    pods as the API shows them (created from the reconciler's own Create actions)."""

    manifest: dict[str, Any]
    generation: int = 1
    status: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    now: datetime = T0
    uid: str = "uid-1"

    def object(self) -> dict[str, Any]:
        """The FineTuneJob as Argo CD sees it."""
        meta = {**self.manifest["metadata"], "generation": self.generation, "uid": self.uid}
        body = {**self.manifest, "metadata": meta}
        if self.status:
            body["status"] = self.status
        return body

    def reconcile(self, seconds: float = 1) -> Outcome:
        self.now += timedelta(seconds=seconds)
        meta = self.manifest["metadata"]
        job = Job(JobRef(name=meta["name"], namespace=meta["namespace"], uid=self.uid), self.generation,
                  self.manifest["spec"], self.status)
        outcome = reconcile(job, list(self.pods.values()), SETTINGS, self.now)
        for action in outcome.actions:
            if isinstance(action, Create) and action.child["kind"] == "Pod":
                pod = json.loads(json.dumps(action.child))
                pod["metadata"].update(uid=f"{pod['metadata']['name']}-{len(self.pods)}-{self.now.timestamp()}",
                                       creationTimestamp=stamp(self.now))
                pod["status"] = {"phase": "Pending"}
                self.pods[pod["metadata"]["name"]] = pod
            elif isinstance(action, Delete):
                self.pods.pop(action.name, None)
        if outcome.status is not None:
            self.status = outcome.status
        return outcome

    def set_pods(self, phase: str, *, prefix: str = "", exit_code: int | None = None,
                 message: str | None = None) -> None:
        for name, pod in self.pods.items():
            if not name.startswith(prefix):
                continue
            pod["status"] = {"phase": phase}
            if exit_code is not None:
                terminated: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                                              "finishedAt": stamp(self.now)}
                if message is not None:
                    terminated["message"] = message
                container = pod["spec"]["containers"][0]["name"]
                pod["status"]["containerStatuses"] = [{"name": container, "state": {"terminated": terminated}}]

    def edit_spec(self, **run_policy: Any) -> None:
        """A commit that changes spec.runPolicy (the one part that may change): a new generation."""
        spec = {**self.manifest["spec"], "runPolicy": {**self.manifest["spec"].get("runPolicy", {}), **run_policy}}
        self.manifest = {**self.manifest, "spec": spec}
        self.generation += 1


@pytest.fixture(scope="module")
def lua_health():
    from lupa.lua51 import LuaRuntime  # Argo CD's gopher-lua is Lua 5.1

    script = HEALTH_LUA.read_text()

    def health(obj: dict[str, Any]) -> tuple[str, str]:
        lua = LuaRuntime(register_eval=False, unpack_returned_tuples=True)
        for unsafe in ("os", "io", "require", "dofile", "loadfile", "debug", "package"):
            lua.globals()[unsafe] = None  # Argo CD's sandbox offers none of these
        lua.globals().obj = lua.table_from(json.loads(json.dumps(obj)), recursive=True)
        hs = lua.execute(script)
        return hs["status"], hs["message"]

    return health


def job_manifest() -> dict[str, Any]:
    (manifest,) = jobs()
    return manifest


def test_health_follows_a_job_through_restart_suspend_and_success(lua_health) -> None:
    life = Life(job_manifest())
    seen: dict[str, tuple[str, str]] = {}

    def check(phase: str, health: str, *contains: str) -> None:
        assert life.status.get("phase") == phase, life.status
        status, message = lua_health(life.object())
        assert status == health, (phase, message)
        assert life.status["message"] in message
        for text in contains:
            assert text in message
        seen[phase] = (status, message)

    assert lua_health(life.object()) == ("Progressing", "waiting for the kubetune operator to pick up the job")
    life.reconcile()
    check("Validating", "Progressing", "Validating: checking the job's inputs in pod support-bot-v1-preflight")
    life.set_pods("Succeeded", prefix="support-bot-v1-preflight", exit_code=0)
    life.reconcile()
    check("Pending", "Progressing", "waiting for all 2 workers to run (attempt 1)")
    life.set_pods("Running", prefix="support-bot-v1-worker")
    life.reconcile()
    check("Running", "Progressing")
    # The operator scrapes rank 0's metrics into status.progress between passes.
    life.status = {**life.status, "progress": {"step": 40, "totalSteps": 150, "display": "40/150",
                                               "stepTime": stamp(life.now + timedelta(seconds=1))}}
    life.reconcile(seconds=2)
    check("Running", "Progressing", "(step 40/150)")

    life.set_pods("Failed", prefix="support-bot-v1-worker-1", exit_code=1, message="RuntimeError: NCCL timeout")
    life.reconcile()
    check("Restarting", "Progressing", "RuntimeError: NCCL timeout", "(step 40/150)")
    life.reconcile(seconds=30)  # the old gang is gone, the back-off has passed: attempt 2
    check("Pending", "Progressing", "attempt 2")
    life.set_pods("Running", prefix="support-bot-v1-worker")
    life.reconcile()
    check("Running", "Progressing", "attempt 2")

    # A commit sets suspend: until the operator acts, the status is of the last generation.
    life.edit_spec(suspend=True)
    status, message = lua_health(life.object())
    assert status == "Progressing" and "generation 2 (status is of generation 1)" in message
    life.reconcile()
    check("Suspended", "Suspended")
    assert life.status["observedGeneration"] == 2
    life.edit_spec(suspend=False)
    assert lua_health(life.object())[0] == "Progressing"
    life.reconcile()
    check("Pending", "Progressing", "attempt 3")

    life.set_pods("Running", prefix="support-bot-v1-worker")
    life.reconcile()
    life.status = {**life.status, "progress": {"step": 150, "totalSteps": 150, "display": "150/150",
                                               "stepTime": stamp(life.now + timedelta(seconds=1))}}
    life.reconcile(seconds=2)
    check("Publishing", "Progressing", "(step 150/150)")
    done = TerminationMessage(outcome="Succeeded", steps=150, total_steps=150, final_loss=1.0543, tokens=7680,
                              manifest_sha256="ab" * 32).render()
    life.set_pods("Succeeded", prefix="support-bot-v1-worker-0", exit_code=0, message=done)
    life.set_pods("Succeeded", prefix="support-bot-v1-worker-1", exit_code=0)
    life.reconcile()
    check("Succeeded", "Healthy", "adapter published to s3://adapters/support-bot-v1/ (final loss 1.0543)")

    # Flipping suspend on a finished job changes nothing the operator writes: the status stays
    # of generation 3 for good, and the job stays Healthy.
    life.edit_spec(suspend=True)
    assert life.reconcile().status is None
    assert life.status["observedGeneration"] < life.generation
    assert lua_health(life.object())[0] == "Healthy"
    assert set(seen) == {"Validating", "Pending", "Running", "Restarting", "Suspended", "Publishing", "Succeeded"}


def test_health_of_a_failed_job_is_degraded_with_the_operators_message(lua_health) -> None:
    life = Life(job_manifest())
    life.reconcile()
    lines = "FAIL dataset: s3://datasets/quickstart/train.jsonl: NoSuchKey"
    failed = TerminationMessage.failed(f"preflight: {lines}", ExitCode.PREFLIGHT_FAILED).render()
    life.set_pods("Failed", prefix="support-bot-v1-preflight", exit_code=int(ExitCode.PREFLIGHT_FAILED),
                  message=failed)
    life.reconcile()
    assert life.status["phase"] == "Failed"
    assert lua_health(life.object()) == ("Degraded", life.status["message"])
    assert life.status["message"] == f"preflight failed: {lines}"


def test_a_job_created_suspended_is_suspended(lua_health) -> None:
    manifest = job_manifest()
    life = Life({**manifest, "spec": {**manifest["spec"], "runPolicy": {"suspend": True}}})
    life.reconcile()
    assert lua_health(life.object()) == ("Suspended", life.status["message"]) == ("Suspended", "suspended")


def test_a_phase_the_check_does_not_know_is_unknown(lua_health) -> None:
    body = {**job_manifest(), "status": {"phase": "Quantum", "message": "from a newer operator"}}
    assert lua_health(body) == ("Unknown", "unknown phase Quantum: from a newer operator")


def test_the_health_check_knows_every_phase_of_the_crd(lua_health) -> None:
    (version,) = load_crd()["spec"]["versions"]
    phases = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"]
    for phase in phases:
        body = {**job_manifest(), "status": {"phase": phase, "message": "m", "observedGeneration": 1}}
        assert lua_health(body)[0] != "Unknown", phase


# -- on the real API server ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kubetune.cli.demo import Kubectl, install_crd
    from kubetune.localcluster.cluster import LocalCluster

    with LocalCluster(state_dir=tmp_path_factory.mktemp("gitops-cluster"), network="loopback", node=False) as cluster:
        client = Kubectl(str(cluster.kubeconfig))
        install_crd(client, REPO)
        client.run("create", "namespace", "ml")
        yield client


@pytest.mark.e2e  # the real API server
def test_server_side_apply_of_an_unchanged_job_is_a_no_op(kubectl, tmp_path: Path) -> None:
    manifest = job_manifest()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**manifest, "metadata": {**manifest["metadata"], "name": "noop"}}))
    first = kubectl.run("apply", "--server-side", "-f", str(path))
    before = kubectl.json("get", "ftj", "noop", "-n", "ml")["metadata"]
    second = kubectl.run("apply", "--server-side", "-f", str(path))
    after = kubectl.json("get", "ftj", "noop", "-n", "ml")["metadata"]
    assert first.stdout.strip() == second.stdout.strip() == "finetunejob.kubetune.dev/noop serverside-applied"
    assert before["generation"] == after["generation"] == 1
    assert before["resourceVersion"] == after["resourceVersion"]
    diff = kubectl.run("diff", "--server-side", "-f", str(path), check=False)
    assert (diff.returncode, diff.stdout) == (0, "")  # what Argo CD's server-side diff sees: nothing


@pytest.mark.e2e  # the real API server
def test_a_changed_spec_is_refused_with_the_crds_message_but_suspend_may_change(kubectl, tmp_path: Path) -> None:
    manifest = job_manifest()
    manifest = {**manifest, "metadata": {**manifest["metadata"], "name": "immutable"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubectl.run("apply", "--server-side", "-f", str(path))

    changed = json.loads(json.dumps(manifest))
    changed["spec"]["training"]["learningRate"] = 2.0e-4
    path.write_text(yaml.safe_dump(changed))
    refused = kubectl.run("apply", "--server-side", "-f", str(path), check=False)
    assert refused.returncode != 0
    rule = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"][0]
    assert "oldSelf" in rule["rule"]
    assert " ".join(rule["message"].split()) in refused.stderr
    quoted = refused.stderr.strip().replace('"immutable"', f'"{job_manifest()["metadata"]["name"]}"')
    assert quoted in (GITOPS / "README.md").read_text()  # the README quotes the real message
    job = kubectl.json("get", "ftj", "immutable", "-n", "ml")
    assert job["metadata"]["generation"] == 1 and job["spec"]["training"]["learningRate"] == 1.0e-3

    suspended = json.loads(json.dumps(manifest))
    suspended["spec"]["runPolicy"]["suspend"] = True
    path.write_text(yaml.safe_dump(suspended))
    kubectl.run("apply", "--server-side", "-f", str(path))
    job = kubectl.json("get", "ftj", "immutable", "-n", "ml")
    assert job["metadata"]["generation"] == 2 and job["spec"]["runPolicy"]["suspend"] is True
