"""The trainer config the operator renders: every field resolved (nothing left for the trainer to
guess), the platform's S3 endpoint for jobs that name none, never a credential, and always a
document the trainer's own parser takes back unchanged."""

from __future__ import annotations

import json

import pytest
from crd_tools import EXAMPLES, load_manifest, minimal_spec

from kubetune.api import JobRef, parse_config, parse_spec
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.trainer_config import CONFIG_ANNOTATION
from kubetune.operator.manifests import build_worker_pod, trainer_config
from kubetune.operator.settings import OperatorSettings

QUICKSTART = JobRef(name="quickstart", namespace="default", uid="u-1")


def _carried(spec: FineTuneJobSpec, settings: OperatorSettings) -> str:
    """The config as a worker pod carries it (its annotation, the file its trainer reads)."""
    return build_worker_pod(QUICKSTART, spec, 0, settings)["metadata"]["annotations"][CONFIG_ANNOTATION]


def test_quickstart_renders_the_whole_resolved_config() -> None:
    spec = parse_spec(load_manifest(EXAMPLES / "quickstart.yaml")["spec"])
    settings = OperatorSettings(s3_endpoint="http://s3.kubetune-system.svc.cluster.local:9000")
    rendered = json.loads(_carried(spec, settings))
    assert rendered == {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": "quickstart", "uid": "u-1"},
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {
            "uri": "s3://datasets/quickstart/train.jsonl", "format": "text", "textField": "text",
            "messagesField": "messages", "promptField": "prompt", "responseField": "response",
            "validationSplit": 0.0, "validationUri": None, "overlong": "truncate",
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
        "training": {
            "epochs": 5, "maxSteps": 150, "learningRate": 0.001, "microBatchSize": 4, "globalBatchSize": 8,
            "sequenceLength": 128, "seed": 42, "precision": "auto", "logEverySteps": 1, "packing": False,
            "warmupSteps": None, "minLearningRate": 0.0, "gradientCheckpointing": False, "gradientClipping": 1.0,
        },
        "deepspeed": {"zeroStage": 2, "offload": "none", "config": None},
        "output": {"adapterUri": "s3://adapters/quickstart/", "checkpointUri": None, "checkpointEverySteps": 0,
                   "keepCheckpoints": 2, "overwrite": False},
        "evaluation": {"atStart": False, "retentionUri": None, "retentionTextField": "text"},
        "qualityGate": {"maxEvalLoss": None, "maxRetentionLossIncrease": None},
        "storage": {"endpoint": "http://s3.kubetune-system.svc.cluster.local:9000", "region": "us-east-1",
                    "credentialsSecret": "s3-credentials", "checksums": "when_required"},
        "metrics": {"port": 9400},
    }


def test_job_endpoint_wins_over_operator_default() -> None:
    spec = parse_spec(minimal_spec(storage={"endpoint": "https://s3.example", "region": "eu-west-1"}))
    storage = trainer_config(QUICKSTART, spec, OperatorSettings(s3_endpoint="http://local:9000")).storage
    assert (storage.endpoint, storage.region) == ("https://s3.example", "eu-west-1")


def test_the_checksum_setting_reaches_the_trainer() -> None:
    default = trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings()).storage
    assert default.checksums == "when_required"  # what every S3-compatible store takes
    spec = parse_spec(minimal_spec(storage={"checksums": "when_supported"}))
    text = _carried(spec, OperatorSettings())
    assert parse_config(json.loads(text)).storage.checksums == "when_supported"


def test_no_endpoint_anywhere_means_aws() -> None:
    assert trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings()).storage.endpoint is None


def test_credentials_never_reach_the_config() -> None:
    spec = parse_spec(minimal_spec(storage={"credentialsSecret": "s3-credentials"}))
    text = _carried(spec, OperatorSettings())
    assert "AWS_" not in text  # only the Secret's name: its values go from the Secret to the pods


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "dataset": {"uri": "s3://datasets/chat.jsonl", "format": "chat", "validationSplit": 0.1},
            "training": {"precision": "bf16", "maxSteps": 5, "microBatchSize": 2, "globalBatchSize": 16},
            "deepspeed": {"zeroStage": 3, "offload": "cpu"},
            "storage": {"endpoint": "https://s3.example:9000", "region": "eu-west-1"},
        },
        {
            "dataset": {"uri": "s3://datasets/chat.parquet", "validationUri": "s3://datasets/v.parquet",
                        "overlong": "drop"},
            "output": {"adapterUri": "s3://adapters/a/", "checkpointUri": "s3://ckpt/a/",
                       "checkpointEverySteps": 50, "keepCheckpoints": 3},
            "qualityGate": {"maxEvalLoss": 2.5, "maxRetentionLossIncrease": 0.05},
            "evaluation": {"atStart": True, "retentionUri": "s3://datasets/general.jsonl", "retentionTextField": "body"},
            "training": {"packing": True, "sequenceLength": 1024},
        },
        {
            "training": {"warmupSteps": 0, "minLearningRate": 1e-5, "gradientCheckpointing": True,
                         "gradientClipping": 0.5},
            "deepspeed": {"zeroStage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 50000000}}},
        },
    ],
)
def test_rendered_config_comes_back_unchanged_from_the_trainers_parser(overrides: dict) -> None:
    # The config is the only input of a worker: the trainer's parser (unknown keys are an error
    # there) must take whatever the operator renders, and read the same values.
    spec = parse_spec(minimal_spec(**overrides))
    rendered = json.loads(_carried(spec, OperatorSettings()))
    assert parse_config(rendered).to_document() == rendered
