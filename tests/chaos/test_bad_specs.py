"""Chaos table row 7, "Bad specs": hundreds of invalid FineTuneJobs, each refused naming its field.

Every invalid manifest must end in one of three ways, and nothing else:

(a) refused at admission by the real API server (a server-side dry-run create, or update for
    the immutable fields), with a message naming the field;
(b) accepted by admission but failed at once by the pure reconciler (what the operator runs):
    phase Failed, a message naming the field, no child created, and nothing created when it
    reconciles its own Failed status again (no retry loop);
(c) only for the fields kubetune passes to its pods as written (``PASS_THROUGH``: affinity, node
    selector, tolerations, env, the image, all of which the preflight pod carries too): accepted
    by both, the API server refuses the first pod the reconciler asks for, sent as the operator
    sends it (``Kube.create``), naming the pod's field, and the job fails ChildRefused with that
    message (``creation_failed``, as the handler does on a 4xx).

The cases come from the CRD's own schema (``crds/finetunejob.yaml``, generated from the types):
every field gets a wrong type, every bound, pattern, enum, length and item count gets a value
just past it, every string a 100 KB value, every required field goes missing and every object
gets an unknown field, so a new field is covered without touching this file. Hand-written cases
add the cross-field rules (and a check that every rule of the CRD was met by some case), names
the job's children cannot carry, and edits of the immutable spec. Valid edge cases (bounds,
the longest names, unicode in free text) must pass the API server, the reconciler and the API
server again for every child the reconciler creates.

Unknown fields are refused as ``kubectl apply`` refuses them: with strict field validation
(kubectl's default); a client that does not ask for it has them pruned, as for every CRD.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos_table import TABLE
from kubernetes import client, config

from kubetune.api.resource import API_VERSION, GROUP, KIND, MAX_NAME_LENGTH, PLURAL, VERSION
from kubetune.api.spec import (
    DEEPSPEED_OWNED_KEYS, DNS_SUBDOMAIN_PATTERN, HTTP_URL_PATTERN, LABEL_VALUE_PATTERN, QUANTITY_PATTERN,
    S3_URI_PATTERN, WORKER_ENV_OWNED,
)
from kubetune.operator.kube import Kube
from kubetune.operator.reconcile import Create, Job, creation_failed, reconcile
from kubetune.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetunejob.yaml"
NAMESPACE = "default"
BIG = 100 * 1024
"""A huge string: 100 KB."""
UNKNOWN = "bogusField"
MISSING = object()

PASS_THROUGH = {
    "spec.scheduling.affinity": "spec.affinity",
    "spec.scheduling.nodeSelector": "spec.nodeSelector",
    "spec.scheduling.tolerations": "spec.tolerations",
    "spec.workers.env": "spec.containers[0].env",
    "spec.workers.envFrom": "spec.containers[0].envFrom",
    "spec.workers.image": "spec.containers[0].image",
}
"""Job fields handed to the pods as written (the API server checks them when the pods are
created), with the pod field the API server then names: only these may end in (c)."""
FREE_TEXT = {"spec.workers.env[].value"}
"""String fields where any length is valid (a variable's value): no 100 KB case."""

BAD_BY_PATTERN: dict[str, list[str]] = {
    S3_URI_PATTERN: [
        "http://models/tiny-llama/", "models/tiny-llama/", "S3://models/tiny-llama/", "s3://",
        "s3:///tiny-llama/", "s3://ab/x", "s3://Models/tiny-llama/", "s3://-models/x/",
        "s3:// models/x/", "s3://" + "b" * 64 + "/x",
    ],
    DNS_SUBDOMAIN_PATTERN: ["Upper-Case", "under_score", "-leading", "trailing-", "has space", "ünicode"],
    QUANTITY_PATTERN: ["1GB", "-1Gi", "lots", "1.5.5", "Gi"],
    LABEL_VALUE_PATTERN: ["-leading", "trailing_", "has space", "a/b"],
    HTTP_URL_PATTERN: ["ftp://minio:9000", "http://", "minio:9000", "http:// minio", "https:///path"],
}
"""Values each pattern of the CRD must refuse; a new pattern needs its own here (the test says so)."""


def _valid_like(pattern: str | None, length: int) -> str:
    """A string of ``length`` characters that matches ``pattern``."""
    if pattern == S3_URI_PATTERN:
        return "s3://bucket/" + "k" * (length - 12)
    if pattern == HTTP_URL_PATTERN:
        return "http://" + "h" * (length - 7)
    if pattern == QUANTITY_PATTERN:
        return "1" * length
    return "a" * length


# -- the manifests -------------------------------------------------------------------------------
def manifest(name: str = "bad-spec", **spec: Any) -> dict[str, Any]:
    """A minimal valid FineTuneJob, with top-level spec blocks replaced."""
    body = {
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {"uri": "s3://datasets/quickstart/train.jsonl"},
        "output": {"adapterUri": "s3://adapters/quickstart/"},
    }
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": body}


FULL = yaml.safe_load("""
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata: {name: everything, namespace: default}
spec:
  model: {uri: "s3://models/tiny-llama/"}
  dataset:
    uri: s3://datasets/support/train.jsonl
    format: instruction
    textField: text
    messagesField: messages
    promptField: prompt
    responseField: response
    validationSplit: 0
    validationUri: s3://datasets/support/eval.jsonl
    overlong: drop
  lora: {r: 16, alpha: 32, dropout: 0.1, targetModules: [q_proj, k_proj, v_proj, o_proj]}
  training:
    epochs: 2
    maxSteps: 100
    learningRate: 1.0e-4
    microBatchSize: 2
    globalBatchSize: 8
    sequenceLength: 256
    seed: 7
    precision: fp32
    logEverySteps: 5
    packing: true
    warmupSteps: 10
    minLearningRate: 1.0e-5
    gradientCheckpointing: true
    gradientClipping: 0.5
  deepspeed: {zeroStage: 3, offload: cpu, config: {zero_optimization: {overlap_comm: true}}}
  workers:
    replicas: 2
    gpusPerWorker: 2
    image: registry.example.com/kubetune/trainer:0.1.0
    resources: {limits: {cpu: 4, memory: 16Gi}, requests: {cpu: "2", memory: 8Gi}}
    env:
      - {name: NCCL_DEBUG, value: INFO}
      - {name: NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName, apiVersion: v1}}}
      - {name: MEMORY_MB, valueFrom: {resourceFieldRef: {resource: limits.memory, containerName: trainer,
                                                           divisor: 1Mi}}}
      - {name: HF_TOKEN, valueFrom: {secretKeyRef: {name: hf-token, key: token, optional: true}}}
      - {name: LEVEL, valueFrom: {configMapKeyRef: {name: settings, key: level, optional: true}}}
    envFrom:
      - {prefix: CFG_, configMapRef: {name: settings, optional: true}}
      - {secretRef: {name: extra-env, optional: true}}
    serviceAccountName: trainer
    imagePullSecrets: [registry-pull]
    shmSize: 2Gi
    runAsUser: 1001
    runAsGroup: 1001
  scheduling:
    nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 60}
      - {key: team, operator: Equal, value: ml, effect: PreferNoSchedule}
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms: [{matchExpressions: [{key: zone, operator: In, values: [a, b]}]}]
      podAffinity:
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 10
            podAffinityTerm: {topologyKey: zone, labelSelector: {matchLabels: {team: ml}}}
      podAntiAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          - {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {kubetune.dev/job-name: everything}}}
    priorityClassName: training
    schedulerName: default-scheduler
    queueName: team-a
  output:
    adapterUri: s3://adapters/support/
    checkpointUri: s3://checkpoints/support/
    checkpointEverySteps: 20
    keepCheckpoints: 3
    overwrite: true
  evaluation: {atStart: true, retentionUri: s3://datasets/general.jsonl, retentionTextField: body}
  qualityGate: {maxEvalLoss: 2.5, maxRetentionLossIncrease: 0.05}
  storage: {endpoint: "http://minio.minio.svc:9000", region: eu-west-1, credentialsSecret: s3-credentials}
  runPolicy:
    suspend: false
    backoffLimit: 5
    activeDeadlineSeconds: 3600
    stallTimeoutSeconds: 600
    startupTimeoutSeconds: 300
    ttlSecondsAfterFinished: 86400
    cleanPodPolicy: All
    skipPreflight: false
""")
"""A valid job with every object and list of the schema present, and nearly every field set: the
ground the schema-derived cases stand on, one field broken at a time (a field it lacks, such as
a new one, is broken on it all the same)."""


def fmt(path: tuple[str | int, ...]) -> str:
    """A field path as the API server writes it: spec.workers.env[0].name."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def general(path: tuple[str | int, ...]) -> str:
    """The schema's path of a field: spec.workers.env[].name."""
    return re.sub(r"\[\d+\]", "[]", fmt(path))


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    node: Any = body
    for part in path[:-1]:
        node = node[part]
    if value is MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


@dataclass
class Case:
    id: str
    body: dict[str, Any]
    field: str
    """The field the refusal must name, as the API server writes it."""
    old: dict[str, Any] | None = None
    """An update of this stored job (the immutable spec), instead of a create."""


def crd_schema() -> dict[str, Any]:
    (version,) = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def schema_nodes(schema: dict[str, Any]) -> dict[str, tuple[tuple[str | int, ...], dict[str, Any], Any]]:
    """{schema path: (a concrete path in FULL, its schema, FULL's value or MISSING)} for every
    field of the spec; a list's fields are found in whichever item sets them."""
    found: dict[str, tuple[tuple[str | int, ...], dict[str, Any], Any]] = {}

    def walk(path: tuple[str | int, ...], node: dict[str, Any], value: Any) -> None:
        key = general(path)
        if key not in found or (found[key][2] is MISSING and value is not MISSING):
            found[key] = (path, node, value)
        if value is MISSING or node.get("x-kubernetes-preserve-unknown-fields"):
            return
        for name, sub in (node.get("properties") or {}).items():
            walk(path + (name,), sub, value.get(name, MISSING))
        if "additionalProperties" in node:
            for name, item in value.items():
                walk(path + (name,), node["additionalProperties"], item)
                break
        if "items" in node:
            for index, item in enumerate(value):
                walk(path + (index,), node["items"], item)

    walk(("spec",), schema["properties"]["spec"], FULL["spec"])
    return found


WRONG_TYPE = {"integer": "seven", "number": "fast", "string": 12345, "boolean": "yes", "array": "not-a-list",
              "object": "not-an-object"}


def bad_values(path: str, node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(what, value) for every way the schema says a value of this field is wrong."""
    kind = node.get("type")
    if node.get("x-kubernetes-int-or-string"):
        yield "wrong type", ["a", "list"]
    else:
        yield "wrong type", WRONG_TYPE[kind]
    if kind == "integer":
        yield "a fraction", 2.5
    step = 1 if kind == "integer" else 0.25
    if "minimum" in node:
        yield "below the minimum", node["minimum"] if node.get("exclusiveMinimum") else node["minimum"] - step
    if "maximum" in node:
        yield "above the maximum", node["maximum"] if node.get("exclusiveMaximum") else node["maximum"] + step
    if "enum" in node:
        if kind == "string":
            yield "not in the enum", "bogus"
            yield "the enum in another case", node["enum"][0].swapcase()
        else:
            yield "below the enum", min(node["enum"]) - 1
            yield "above the enum", max(node["enum"]) + 1
    if "pattern" in node:
        assert node["pattern"] in BAD_BY_PATTERN, f"{path}: add values {node['pattern']} refuses to BAD_BY_PATTERN"
        for value in BAD_BY_PATTERN[node["pattern"]]:
            yield f"not matching its pattern ({value[:24]!r})", value
    if "minLength" in node:
        yield "shorter than minLength", "a" * (node["minLength"] - 1)
    if "maxLength" in node:
        yield "longer than maxLength", _valid_like(node.get("pattern"), node["maxLength"] + 1)
    if kind == "string" and "enum" not in node and path not in FREE_TEXT:
        yield "100 KB", _valid_like(node.get("pattern"), BIG)
    if "minItems" in node:
        yield "fewer items than minItems", []
    if "maxItems" in node:
        yield "more items than maxItems", None  # filled in by the caller from the field's own items


def schema_cases() -> list[Case]:
    """One case per way each field of the schema can be wrong, on FULL."""
    cases = []
    nodes = schema_nodes(crd_schema())
    for key, (path, node, value) in nodes.items():
        if node.get("type") == "array" or node.get("type") == "object" and "properties" in node:
            assert value is not MISSING, f"FULL has no {key}: add one (the cases inside it stand on it)"
        where = fmt(path)
        for what, bad in bad_values(key, node):
            if what == "more items than maxItems":
                bad = [copy.deepcopy(value[0]) for _ in range(node["maxItems"] + 1)]
            cases.append(Case(f"{key} {what}", with_value(FULL, path, bad), where))
        if node.get("type") == "object" and "properties" in node:
            for name in node.get("required", []):
                cases.append(Case(f"{key}.{name} missing", with_value(FULL, path + (name,), MISSING),
                                  fmt(path + (name,))))
            cases.append(Case(f"{key} unknown field", with_value(FULL, path + (UNKNOWN,), 1),
                              fmt(path + (UNKNOWN,))))
        if "additionalProperties" in node:
            cases.append(Case(f"{key} map value of the wrong type",
                              with_value(FULL, path + ("cpu",), {"an": "object"}), fmt(path + ("cpu",))))
    cases.append(Case("unknown top-level field", with_value(FULL, (UNKNOWN,), 1), UNKNOWN))
    cases.append(Case("no spec", with_value(FULL, ("spec",), MISSING), "spec"))
    return cases


# -- hand-written: cross-field rules, names, children, immutability ------------------------------
def _workers(**fields: Any) -> dict[str, Any]:
    return {"replicas": 1, **fields}


def rule_cases() -> list[Case]:
    """The combinations the types' rules forbid (every x-kubernetes-validations rule of the CRD
    is met by one of these; a test checks it)."""
    m = manifest
    cases = [
        Case("dataset.uri is a folder", m(dataset={"uri": "s3://datasets/quickstart/"}), "spec.dataset.uri"),
        Case("validationUri with validationSplit",
             m(dataset={"uri": "s3://data/train.jsonl", "validationUri": "s3://data/eval.jsonl", "validationSplit": 0.1}),
             "spec.dataset.validationSplit"),
        Case("minLearningRate above learningRate", m(training={"learningRate": 1e-4, "minLearningRate": 1e-3}),
             "spec.training.minLearningRate"),
        Case("globalBatchSize not a multiple (micro)", m(training={"microBatchSize": 4, "globalBatchSize": 6}),
             "spec.training.globalBatchSize"),
        Case("globalBatchSize not a multiple (replicas)",
             m(training={"microBatchSize": 4, "globalBatchSize": 8}, workers={"replicas": 3}),
             "spec.training.globalBatchSize"),
        Case("globalBatchSize not a multiple (GPUs)",
             m(training={"microBatchSize": 1, "globalBatchSize": 4}, workers={"replicas": 1, "gpusPerWorker": 3}),
             "spec.training.globalBatchSize"),
        Case("globalBatchSize below micro x processes",
             m(training={"microBatchSize": 4, "globalBatchSize": 4}, workers={"replicas": 2}),
             "spec.training.globalBatchSize"),
        Case("qualityGate without evaluation data", m(qualityGate={"maxEvalLoss": 1.5}), "spec.qualityGate.maxEvalLoss"),
        Case("retention gate without retention data", m(qualityGate={"maxRetentionLossIncrease": 0.1}),
             "spec.qualityGate.maxRetentionLossIncrease"),
        Case("checkpointUri equals adapterUri",
             m(output={"adapterUri": "s3://out/a/", "checkpointUri": "s3://out/a/"}), "spec.output.checkpointUri"),
        Case("checkpointUri inside adapterUri",
             m(output={"adapterUri": "s3://out/a/", "checkpointUri": "s3://out/a/ckpt/"}), "spec.output.checkpointUri"),
        Case("adapterUri inside checkpointUri",
             m(output={"adapterUri": "s3://out/ckpt/a", "checkpointUri": "s3://out/ckpt"}), "spec.output.checkpointUri"),
        Case("GPU in resources.limits", m(workers=_workers(resources={"limits": {"nvidia.com/gpu": 1}})),
             "spec.workers.resources"),
        Case("GPU in resources.requests", m(workers=_workers(resources={"requests": {"nvidia.com/gpu": "2"}})),
             "spec.workers.resources"),
        Case("env value and valueFrom",
             m(workers=_workers(env=[{"name": "A", "value": "x",
                                       "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])),
             "spec.workers.env[]"),
        Case("env valueFrom names nothing", m(workers=_workers(env=[{"name": "A", "valueFrom": {}}])),
             "spec.workers.env[].valueFrom"),
        Case("env valueFrom names two",
             m(workers=_workers(env=[{"name": "A", "valueFrom": {
                 "fieldRef": {"fieldPath": "spec.nodeName"}, "secretKeyRef": {"name": "s", "key": "k"}}}])),
             "spec.workers.env[].valueFrom"),
        Case("envFrom names nothing", m(workers=_workers(envFrom=[{"prefix": "X_"}])), "spec.workers.envFrom[]"),
        Case("envFrom names both",
             m(workers=_workers(envFrom=[{"configMapRef": {"name": "c"}, "secretRef": {"name": "s"}}])),
             "spec.workers.envFrom[]"),
        Case("toleration without key or Exists", m(scheduling={"tolerations": [{"value": "x"}]}),
             "spec.scheduling.tolerations[]"),
        Case("toleration Exists with a value",
             m(scheduling={"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}),
             "spec.scheduling.tolerations[]"),
        Case("tolerationSeconds without NoExecute",
             m(scheduling={"tolerations": [{"key": "k", "operator": "Exists", "tolerationSeconds": 5}]}),
             "spec.scheduling.tolerations[]"),
        Case("tolerationSeconds with NoSchedule",
             m(scheduling={"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]}),
             "spec.scheduling.tolerations[]"),
        # Beyond the schema (a map's keys, an int-or-string's text): the types check these, so the
        # reconciler fails the job before its preflight pod, which does not carry the resources.
        Case("resources.limits not a quantity", m(workers=_workers(resources={"limits": {"cpu": "lots"}})),
             "spec.workers.resources.limits.cpu"),
        Case("resources.requests negative", m(workers=_workers(resources={"requests": {"memory": -1}})),
             "spec.workers.resources.requests.memory"),
        Case("resources.limits not a resource", m(workers=_workers(resources={"limits": {"bad name!": 1}})),
             "spec.workers.resources.limits.bad name!"),
        Case("resources.limits an unprefixed extended resource", m(workers=_workers(resources={"limits": {"fpga": 1}})),
             "spec.workers.resources.limits.fpga"),
        Case("resources.requests above limits",
             m(workers=_workers(resources={"limits": {"memory": "1Gi"}, "requests": {"memory": "1025Mi"}})),
             "spec.workers.resources.requests.memory"),
    ]
    for name in WORKER_ENV_OWNED:
        cases.append(Case(f"env sets {name}", m(workers=_workers(env=[{"name": name, "value": "1"}])),
                          "spec.workers.env"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        cases.append(Case(f"env sets {name} beside credentialsSecret",
                          m(workers=_workers(env=[{"name": name, "value": "x"}]), storage={"credentialsSecret": "s3"}),
                          "spec.workers.env"))
    for key in DEEPSPEED_OWNED_KEYS:
        cases.append(Case(f"deepspeed.config sets {key}", m(deepspeed={"config": {key: 1}}),
                          f"spec.deepspeed.config.{key}"))
    return cases


def name_cases() -> list[Case]:
    """Names the job's children (<name>-worker-<index> pods with that hostname, the
    <name>-workers Service) cannot carry."""
    longest = "j" * MAX_NAME_LENGTH
    names = {
        "one over the longest": longest + "x",
        "63 characters": "n" * 63,
        "253 characters": "n" * 253,
        "254 characters": "n" * 254,
        "dotted": "my.job",
        "starts with a digit": "1job",
        "upper case": "MyJob",
        "underscore": "my_job",
        "trailing hyphen": "job-",
        "leading hyphen": "-job",
        "unicode": "jöb",
        "empty": "",
    }
    return [Case(f"metadata.name {what}", manifest(name=name), "metadata.name") for what, name in names.items()]


def pass_through_cases() -> list[Case]:
    """Wrong in the pods' own terms, in the fields handed to them as written (PASS_THROUGH)."""
    m = manifest
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    return [
        Case("affinity.nodeAffinity without terms", m(scheduling={"affinity": affinity}),
             "spec.scheduling.affinity.nodeAffinity"),
        Case("affinity.podAntiAffinity without topologyKey",
             m(scheduling={"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                 {"labelSelector": {"matchLabels": {"a": "b"}}}]}}}),
             "spec.scheduling.affinity.podAntiAffinity"),
        Case("affinity.podAffinity weight 0",
             m(scheduling={"affinity": {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                 {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}]}}}),
             "spec.scheduling.affinity.podAffinity"),
        Case("nodeSelector key not a label key", m(scheduling={"nodeSelector": {"bad key!": "x"}}),
             "spec.scheduling.nodeSelector"),
        Case("nodeSelector value not a label value", m(scheduling={"nodeSelector": {"zone": "has space"}}),
             "spec.scheduling.nodeSelector"),
        Case("toleration key not a label key", m(scheduling={"tolerations": [{"key": "bad key!", "operator": "Exists"}]}),
             "spec.scheduling.tolerations"),
        Case("toleration value not a label value",
             m(scheduling={"tolerations": [{"key": "k", "operator": "Equal", "value": "has space"}]}),
             "spec.scheduling.tolerations"),
        Case("env name with '='", m(workers=_workers(env=[{"name": "A=B", "value": "x"}])), "spec.workers.env"),
        Case("envFrom prefix with '='", m(workers=_workers(envFrom=[{"prefix": "A=", "configMapRef": {"name": "c"}}])),
             "spec.workers.envFrom"),
        Case("image with spaces", m(workers=_workers(image=" kubetune/trainer:0.1.0 ")), "spec.workers.image"),
    ]


def immutable_cases(stored: dict[str, Any]) -> list[Case]:
    """Updates of a stored job (``stored``, FULL as the API server keeps it) that change one field
    other than runPolicy.suspend: one per section of the spec and per runPolicy field, plus
    fields added and removed."""
    schema = crd_schema()["properties"]["spec"]
    cases = []

    def edit(path: tuple[str, ...], value: Any, what: str, named: str) -> None:
        cases.append(Case(f"edit of {fmt(path)}: {what}", with_value(stored, path, value), named, old=stored))

    for key, sub in schema["properties"].items():
        if key == "runPolicy":
            continue
        path, value = _first_leaf(("spec", key), sub, stored["spec"][key])
        edit(path, _changed(sub_schema(schema, path), value), "changed", f"spec.{key}")
    run_policy = schema["properties"]["runPolicy"]
    for key, sub in run_policy["properties"].items():
        if key != "suspend":
            edit(("spec", "runPolicy", key), _changed(sub, stored["spec"]["runPolicy"][key]), "changed",
                 f"spec.runPolicy.{key}")
    edit(("spec", "output", "checkpointUri"), MISSING, "removed", "spec.output")
    edit(("spec", "training", "maxSteps"), MISSING, "removed", "spec.training")
    edit(("spec", "runPolicy", "activeDeadlineSeconds"), MISSING, "removed", "spec.runPolicy.activeDeadlineSeconds")
    edit(("spec", "workers", "env"), [*stored["spec"]["workers"]["env"], {"name": "EXTRA", "value": "1"}],
         "an item added", "spec.workers")
    edit(("spec", "deepspeed", "config"), {}, "emptied", "spec.deepspeed")
    edit(("spec", "scheduling", "affinity"), MISSING, "removed", "spec.scheduling")
    bare = with_value(stored, ("spec", "runPolicy", "ttlSecondsAfterFinished"), MISSING)
    cases.append(Case("edit of spec.runPolicy.ttlSecondsAfterFinished: added",
                      with_value(bare, ("spec", "runPolicy", "ttlSecondsAfterFinished"), 60),
                      "spec.runPolicy.ttlSecondsAfterFinished", old=bare))
    cases.append(Case("edit of spec.runPolicy.suspend and spec.lora.r together",
                      with_value(with_value(stored, ("spec", "runPolicy", "suspend"), True), ("spec", "lora", "r"), 4),
                      "spec.lora", old=stored))
    return cases


def sub_schema(schema: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
    node = schema
    for part in path[1:]:
        node = node["items"] if isinstance(part, int) else node["properties"][part]
    return node


def _first_leaf(path: tuple[str | int, ...], node: dict[str, Any], value: Any) -> tuple[tuple[str | int, ...], Any]:
    """The first scalar field set under ``path``."""
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name in value:
                return _first_leaf(path + (name,), sub, value[name])
    return path, value


def _changed(node: dict[str, Any], value: Any) -> Any:
    """Another valid value of a field."""
    if "enum" in node:
        return next(option for option in node["enum"] if option != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int) and node.get("type") == "integer":
        return value + 1 if value + 1 <= node.get("maximum", value + 1) else value - 1
    if isinstance(value, (int, float)):
        return value / 2 if value else 0.25
    if isinstance(value, str):
        changed = value[:-1] + "x" + value[-1]
        return changed if re.fullmatch(node.get("pattern", ".*"), changed) else _valid_like(node.get("pattern"), 20)
    if isinstance(value, dict):
        return {**value, "added": "x"}
    if isinstance(value, list):
        return [*value, copy.deepcopy(value[0])]
    raise AssertionError(f"no other value for {value!r}")


def invalid_cases() -> list[Case]:
    cases = schema_cases() + rule_cases() + name_cases() + pass_through_cases()
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return cases


# -- valid edge cases ------------------------------------------------------------------------------
def valid_cases() -> list[Case]:
    m = manifest
    longest = "l" * MAX_NAME_LENGTH
    bucket63 = "b" * 63
    return [
        Case("everything set", copy.deepcopy(FULL), ""),
        Case("the minimal spec", m(), ""),
        Case("the quickstart example", yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text()), ""),
        Case("longest name, 64 workers, no preflight (worker-63 is 62 characters)",
             m(name=longest, workers={"replicas": 64}, training={"microBatchSize": 1, "globalBatchSize": 64},
               runPolicy={"skipPreflight": True}), ""),
        Case("longest name with the preflight pod", m(name=longest), ""),
        Case("one-letter name", m(name="a"), ""),
        Case("name of digits and hyphens", m(name="a-1--2-b"), ""),
        Case("replicas 1, globalBatchSize 1", m(workers={"replicas": 1}, training={"microBatchSize": 1, "globalBatchSize": 1}), ""),
        Case("16 GPUs per worker",
             m(workers={"replicas": 2, "gpusPerWorker": 16}, training={"microBatchSize": 1, "globalBatchSize": 32},
               runPolicy={"skipPreflight": True}), ""),
        Case("large LoRA rank and alpha, dropout 0 and 1",
             m(lora={"r": 4096, "alpha": 8192, "dropout": 0, "targetModules": ["q_proj"]}), ""),
        Case("dropout 1", m(lora={"dropout": 1}), ""),
        Case("validationSplit 0.5 and a quality gate",
             m(dataset={"uri": "s3://data/t.jsonl", "validationSplit": 0.5}, qualityGate={"maxEvalLoss": 1e-9}), ""),
        Case("a retention set and a zero retention gate",
             m(evaluation={"atStart": True, "retentionUri": "s3://data/general.parquet"},
               qualityGate={"maxRetentionLossIncrease": 0}), ""),
        Case("validationUri with validationSplit 0 and a quality gate",
             m(dataset={"uri": "s3://data/t.parquet", "validationUri": "s3://data/e.parquet", "validationSplit": 0},
               qualityGate={"maxEvalLoss": 3}), ""),
        Case("minLearningRate equal to learningRate, tiny learningRate",
             m(training={"learningRate": 1e-12, "minLearningRate": 1e-12, "warmupSteps": 0, "gradientClipping": 0}), ""),
        Case("shortest sequenceLength, one step, huge seed",
             m(training={"sequenceLength": 16, "maxSteps": 1, "seed": 2**62, "logEverySteps": 1}), ""),
        Case("negative seed", m(training={"seed": -1}), ""),
        Case("runPolicy bounds",
             m(runPolicy={"backoffLimit": 100, "ttlSecondsAfterFinished": 0, "activeDeadlineSeconds": 1,
                          "stallTimeoutSeconds": 1, "startupTimeoutSeconds": 1, "cleanPodPolicy": "None"}), ""),
        Case("backoffLimit 0", m(runPolicy={"backoffLimit": 0}), ""),
        Case("created suspended", m(runPolicy={"suspend": True}), ""),
        Case("runAsUser and runAsGroup bounds",
             m(workers={"runAsUser": 2147483647, "runAsGroup": 0, "shmSize": "0"}), ""),
        Case("bucket names of 3 and 63 characters, dots",
             m(model={"uri": f"s3://{bucket63}/m/"}, dataset={"uri": "s3://abc/d.jsonl"},
               output={"adapterUri": "s3://my.adapters.bucket/a"}), ""),
        Case("URIs with unicode and spaces in the key",
             m(dataset={"uri": "s3://datasets/données d'été/train.jsonl"},
               output={"adapterUri": "s3://adapters/модель/"}), ""),
        Case("checkpointUri beside adapterUri with a common prefix",
             m(output={"adapterUri": "s3://out/a", "checkpointUri": "s3://out/ab/"}), ""),
        Case("unicode in the dataset's field names",
             m(dataset={"uri": "s3://data/t.jsonl", "format": "instruction", "promptField": "вопрос",
                        "responseField": "答え", "textField": "tëxt 🙂", "messagesField": "messages"}), ""),
        Case("unicode and 100 KB in an env value",
             m(workers={"env": [{"name": "GREETING", "value": "héllo wörld 🌍 $(POD_NAME)"},
                                {"name": "BIG", "value": "v" * BIG}]}), ""),
        Case("longest DNS names and label values",
             m(storage={"credentialsSecret": ".".join(["s" * 63] * 4)[:253].rstrip(".")},
               scheduling={"queueName": "Q" + "q_.-" * 15 + "qq", "schedulerName": "x" * 253}), ""),
        Case("the most list items",
             m(workers={"env": [{"name": f"V{i}", "value": str(i)} for i in range(128)],
                        "envFrom": [{"configMapRef": {"name": f"c{i}"}} for i in range(32)],
                        "imagePullSecrets": [f"pull-{i}" for i in range(16)]},
               scheduling={"tolerations": [{"key": f"k{i}", "operator": "Exists"} for i in range(64)]}), ""),
        Case("toleration of every taint", m(scheduling={"tolerations": [{"operator": "Exists"}]}), ""),
        Case("AWS keys in env without credentialsSecret",
             m(workers={"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "a"},
                                {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
             ""),
        Case("deepspeed.config keys kubetune does not own",
             m(deepspeed={"zeroStage": 1, "config": {"zero_optimization": {"reduce_bucket_size": 5e8},
                                                      "wall_clock_breakdown": True}}), ""),
        Case("storage endpoint with a port and a path", m(storage={"endpoint": "https://s3.example.com:8443/base/"}), ""),
        Case("CPU resources in millicores", m(workers={"resources": {"limits": {"cpu": "1500m", "memory": "1.5Gi"},
                                                                      "requests": {"cpu": 1}}}), ""),
    ]


# -- the API server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[client.ApiClient]:
    """A control plane alone (no node) with the CRD, and the objects FULL's pods refer to."""
    from kubetune.cli.demo import Kubectl, install_crd
    from kubetune.localcluster.cluster import LocalCluster

    with LocalCluster(state_dir=tmp_path_factory.mktemp("bad-specs"), network="loopback", node=False) as local:
        install_crd(Kubectl(str(local.kubeconfig)), REPO)
        configuration = client.Configuration()
        config.load_kube_config(str(local.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 16
        api_client = client.ApiClient(configuration)
        client.CoreV1Api(api_client).create_namespaced_service_account(NAMESPACE, {"metadata": {"name": "trainer"}})
        client.SchedulingV1Api(api_client).create_priority_class({"metadata": {"name": "training"}, "value": 1000})
        _wait_for_the_crd(api_client)
        yield api_client


def _wait_for_the_crd(api_client: client.ApiClient, timeout: float = 30) -> None:
    """Until the API server serves the new resource with its schema (Established comes first)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome, _ = _dry_run(api_client, manifest(name="probe"))
        if outcome is None:
            return
        assert time.monotonic() < deadline, f"the CRD is not served: {outcome}"
        time.sleep(0.2)


def _message(error: client.exceptions.ApiException) -> str:
    try:
        return json.loads(error.body).get("message") or str(error.reason)
    except (TypeError, ValueError):
        return str(error.reason)


def _dry_run(api_client: client.ApiClient, body: dict[str, Any], old: dict[str, Any] | None = None
             ) -> tuple[str | None, dict[str, Any] | None]:
    """(the API server's refusal, or None, and the object as it would be stored)."""
    custom = client.CustomObjectsApi(api_client)
    try:
        if old is None:
            stored = custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body, dry_run="All",
                                                            field_validation="Strict")
        else:
            stored = custom.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body["metadata"]["name"],
                                                             body, dry_run="All", field_validation="Strict")
    except client.exceptions.ApiException as error:
        return _message(error), None
    return None, stored


NOT_AN_API_ANSWER = "the operator's client raised (no API answer: the handler would retry for ever)"


def _dry_run_child(api_client: client.ApiClient, child: dict[str, Any]) -> str | None:
    """The API server's refusal of a child the reconciler creates, sent as the operator sends it
    (``Kube.create``), or None."""
    try:
        Kube(api_client).create(child, dry_run=True)
    except client.exceptions.ApiException as error:
        return _message(error)
    except Exception as error:  # noqa: BLE001 - what the handler does not expect
        return f"{NOT_AN_API_ANSWER}: {error!r}"
    return None


def names(message: str, field: str) -> bool:
    """Whether ``message`` names ``field`` (spec.workers.env[0].name: that, or with [] or no index)."""
    text = " ".join(message.split())
    forms = {field, re.sub(r"\[\d+\]", "[]", field), re.sub(r"\[\d+\]", "", field)}
    return any(form in text for form in forms)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stored_form(body: dict[str, Any]) -> dict[str, Any]:
    """What the operator is handed: the object as stored, with a UID."""
    body = copy.deepcopy(body)
    body["metadata"].setdefault("uid", "00000000-0000-0000-0000-00000000bad5")
    body["metadata"].setdefault("namespace", NAMESPACE)
    return body


def _reconciled_again_creates_nothing(job: Job, status: dict[str, Any]) -> str | None:
    again = reconcile(Job(job.ref, job.generation, job.spec, status), [], OperatorSettings(), _now())
    created = [action for action in again.actions if isinstance(action, Create)]
    if created or (again.status is not None and again.status.get("phase") != "Failed"):
        return f"reconciling the Failed job again created {len(created)} children, phase {again.status}"
    return None


@dataclass
class Verdict:
    case: Case
    how: str
    """admission, reconciler, child, or the reason it failed."""
    ok: bool
    message: str
    seconds: float


def judge_invalid(api_client: client.ApiClient, case: Case) -> Verdict:
    started = time.monotonic()
    refused, stored = _dry_run(api_client, case.body, case.old)
    took = time.monotonic() - started
    if refused is not None:
        ok = names(refused, case.field)
        return Verdict(case, "admission" if ok else "refused without naming the field", ok, refused, took)
    assert stored is not None
    if case.old is not None:
        return Verdict(case, "accepted: an update of an immutable field", False, "", took)
    try:
        job = Job.of(_stored_form(stored))
        outcome = reconcile(job, [], OperatorSettings(), _now())
    except Exception as error:  # noqa: BLE001 - the reconciler must never raise on a spec
        return Verdict(case, "the reconciler raised", False, repr(error), took)
    status = outcome.status or {}
    created = [action.child for action in outcome.actions if isinstance(action, Create)]
    if status.get("phase") == "Failed":
        problems = [problem for problem in (
            None if names(status.get("message", ""), case.field) else "the message does not name the field",
            f"it created {[child['kind'] for child in created]}" if created else None,
            _reconciled_again_creates_nothing(job, status),
        ) if problem]
        ok = not problems
        return Verdict(case, "reconciler" if ok else "; ".join(problems), ok, status.get("message", ""), took)
    prefix = next((prefix for prefix in PASS_THROUGH if case.field.startswith(prefix)), None)
    if prefix is None:
        return Verdict(case, "accepted by the API server and the reconciler", False,
                       f"phase {status.get('phase')}: {status.get('message')}", took)
    for child in created:
        refusal = _dry_run_child(api_client, child)
        if refusal is None:
            continue
        if refusal.startswith(NOT_AN_API_ANSWER):
            return Verdict(case, NOT_AN_API_ANSWER, False, refusal, took)
        failed = creation_failed(job, child, refusal, _now())
        text = (failed.status or {}).get("message", "")
        problems = [problem for problem in (
            None if (failed.status or {}).get("phase") == "Failed" else "creation_failed did not fail the job",
            None if PASS_THROUGH[prefix] in text else f"the message does not name {PASS_THROUGH[prefix]}",
            _reconciled_again_creates_nothing(job, failed.status or {}),
        ) if problem]
        ok = not problems
        return Verdict(case, "child" if ok else "; ".join(problems), ok, text, took)
    return Verdict(case, "accepted by the API server, the reconciler and for its children", False,
                   f"phase {status.get('phase')}", took)


def judge_valid(api_client: client.ApiClient, case: Case) -> Verdict:
    started = time.monotonic()
    refused, stored = _dry_run(api_client, case.body, case.old)
    took = time.monotonic() - started
    if refused is not None:
        return Verdict(case, "refused by the API server", False, refused, took)
    assert stored is not None
    try:
        job = Job.of(_stored_form(stored))
        outcome = reconcile(job, [], OperatorSettings(), _now())
    except Exception as error:  # noqa: BLE001
        return Verdict(case, "the reconciler raised", False, repr(error), took)
    status = outcome.status or {}
    if status.get("phase") not in ("Validating", "Pending", "Suspended"):
        return Verdict(case, "the reconciler did not start it", False, f"{status.get('phase')}: "
                       f"{status.get('message')}", took)
    for child in _children(job, outcome):
        refusal = _dry_run_child(api_client, child)
        if refusal is not None:
            return Verdict(case, f"the API server refused its {child['kind']} {child['metadata']['name']}", False,
                           refusal, took)
    return Verdict(case, "accepted", True, status.get("message", ""), took)


def _children(job: Job, outcome: Any) -> list[dict[str, Any]]:
    """What the reconciler creates for a new job: its first pass's children, and once a preflight
    pod of them has passed, the next pass's (the workers and their Service)."""
    children = [action.child for action in outcome.actions if isinstance(action, Create)]
    preflight = next((child for child in children if child["metadata"]["name"].endswith("-preflight")), None)
    if preflight is not None:
        passed = {**preflight, "metadata": {**preflight["metadata"], "uid": "preflight-uid"},
                  "status": {"phase": "Succeeded"}}
        then = reconcile(Job(job.ref, job.generation, job.spec, outcome.status), [passed], OperatorSettings(), _now())
        children += [action.child for action in then.actions if isinstance(action, Create)]
    unique = {(child["kind"], child["metadata"]["name"]): child for child in children}
    return list(unique.values())


def _report(verdicts: list[Verdict]) -> str:
    return "\n".join(f"- {v.case.id} (must name {v.case.field or '-'}): {v.how}\n    {v.message[:600]}"
                     for v in verdicts if not v.ok)


def _in_parallel(judge: Any, api_client: client.ApiClient, cases: list[Case]) -> list[Verdict]:
    with ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(lambda case: judge(api_client, case), cases))


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stored_full(api: client.ApiClient) -> dict[str, Any]:
    """FULL, created for real (the ground of the immutable-field edits), as the API server keeps it."""
    body = with_value(FULL, ("metadata", "name"), "stored")
    return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)


@pytest.mark.e2e  # the real API server
def test_bad_specs_are_refused_naming_the_field(api: client.ApiClient, stored_full: dict[str, Any]) -> None:
    cases = invalid_cases() + immutable_cases(stored_full)
    assert len(cases) >= 200, len(cases)
    verdicts = _in_parallel(judge_invalid, api, cases)
    row = TABLE.row("Bad specs refused with the field named", figure="dry-run ms")
    for verdict in verdicts:
        row.record(verdict.ok, lost=0, figure=verdict.seconds * 1000,
                   note="" if verdict.ok else f"{verdict.case.id}: {verdict.how}: {verdict.message[:300]}")
    failed = [verdict for verdict in verdicts if not verdict.ok]
    ways = {how: sum(v.how == how for v in verdicts) for how in ("admission", "reconciler", "child")}
    print(f"{len(cases)} bad specs: {ways}")
    assert not failed, f"{len(failed)} of {len(cases)} bad specs were not refused naming their field:\n" + _report(failed)
    # Every rule of the CRD (a new one too) was met by some case: add one to rule_cases otherwise.
    refusals = "\n".join(" ".join(verdict.message.split()) for verdict in verdicts if verdict.how == "admission")
    unmet = [message for message in crd_rule_messages() if message not in refusals]
    assert not unmet, f"no bad spec met these rules of the CRD: {unmet}"


@pytest.mark.e2e  # the real API server
def test_valid_edge_cases_are_accepted(api: client.ApiClient, stored_full: dict[str, Any]) -> None:
    cases = valid_cases()
    suspend = with_value(stored_full, ("spec", "runPolicy", "suspend"), True)
    cases.append(Case("an edit of runPolicy.suspend alone", suspend, "", old=stored_full))
    assert len(cases) >= 20, len(cases)
    verdicts = _in_parallel(judge_valid, api, cases)
    row = TABLE.row("Valid edge cases accepted", figure="dry-run ms")
    for verdict in verdicts:
        row.record(verdict.ok, lost=0, figure=verdict.seconds * 1000,
                   note="" if verdict.ok else f"{verdict.case.id}: {verdict.how}: {verdict.message[:300]}")
    failed = [verdict for verdict in verdicts if not verdict.ok]
    assert not failed, f"{len(failed)} of {len(cases)} valid edge cases were refused:\n" + _report(failed)


def crd_rule_messages() -> list[str]:
    """The message of every x-kubernetes-validations rule of the CRD."""
    messages: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        messages.extend(" ".join(rule["message"].split()) for rule in node.get("x-kubernetes-validations", []))
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if "items" in node:
            walk(node["items"])

    walk(crd_schema())
    return messages


def test_the_reconciler_never_raises_on_a_bad_spec_no_server_checked() -> None:
    """Without admission (a server lacking the CRD's schema): whatever the spec, the reconciler
    decides, it never raises."""
    for case in invalid_cases():
        body = _stored_form({**case.body, "metadata": dict(case.body.get("metadata") or {"name": "x"})})
        try:
            reconcile(Job.of(body), [], OperatorSettings(), _now())
        except Exception as error:  # noqa: BLE001
            raise AssertionError(f"{case.id}: the reconciler raised {error!r}") from error
