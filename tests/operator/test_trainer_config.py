from __future__ import annotations

import pytest
import yaml
from crd_tools import EXAMPLES, load_manifest, minimal_spec
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.spec import parse_spec
from kubetune.operator.trainer_config import JobRef, build_trainer_config, render_trainer_config

QUICKSTART = JobRef(name="quickstart", namespace="default", uid="u-1")


def test_quickstart_renders_the_documented_config() -> None:
    spec = parse_spec(load_manifest(EXAMPLES / "quickstart.yaml")["spec"])
    settings = OperatorSettings(s3_endpoint="http://s3.kubetune-system.svc.cluster.local:9000")
    assert yaml.safe_load(render_trainer_config(QUICKSTART, spec, settings)) == {
        "schemaVersion": 1,
        "job": {"namespace": "default", "name": "quickstart", "uid": "u-1"},
        "model": {"uri": "s3://models/tiny-llama/"},
        "dataset": {
            "uri": "s3://datasets/quickstart/train.jsonl",
            "format": "text",
            "textField": "text",
            "messagesField": "messages",
            "promptField": "prompt",
            "responseField": "response",
            "validationSplit": 0.0,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
        "training": {
            "epochs": 1,
            "maxSteps": 30,
            "learningRate": 0.001,
            "microBatchSize": 4,
            "globalBatchSize": 8,
            "sequenceLength": 128,
            "seed": 42,
            "precision": "auto",
            "logEverySteps": 1,
        },
        "deepspeed": {"zeroStage": 2, "offload": "none"},
        "output": {"adapterUri": "s3://adapters/quickstart/"},
        "storage": {"endpoint": "http://s3.kubetune-system.svc.cluster.local:9000", "region": "us-east-1"},
        "metrics": {"port": 9400},
    }


def test_job_endpoint_wins_over_operator_default() -> None:
    spec = parse_spec(minimal_spec(storage={"endpoint": "https://s3.example", "region": "eu-west-1"}))
    config = build_trainer_config(QUICKSTART, spec, OperatorSettings(s3_endpoint="http://local:9000"))
    assert config["storage"] == {"endpoint": "https://s3.example", "region": "eu-west-1"}


def test_no_endpoint_anywhere_means_aws() -> None:
    config = build_trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings())
    assert config["storage"]["endpoint"] is None
    assert (
        yaml.safe_load(render_trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings()))["training"][
            "maxSteps"
        ]
        is None
    )


def test_credentials_secret_never_reaches_the_config() -> None:
    spec = parse_spec(minimal_spec(storage={"credentialsSecret": "s3-credentials"}))
    text = render_trainer_config(QUICKSTART, spec, OperatorSettings())
    assert "s3-credentials" not in text
    assert "AWS_" not in text


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
            "dataset": {"uri": "s3://datasets/chat.jsonl", "validationSplit": 0.1},
            "output": {"adapterUri": "s3://adapters/a/", "checkpointUri": "s3://ckpt/a/",
                       "checkpointEverySteps": 50, "keepCheckpoints": 3},
            "qualityGate": {"maxEvalLoss": 2.5},
        },
        {
            "training": {"warmupSteps": 0, "minLearningRate": 1e-5, "gradientCheckpointing": True,
                         "gradientClipping": 0.5},
            "deepspeed": {"zeroStage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 50000000}}},
        },
    ],
)
def test_rendered_config_is_accepted_by_the_trainer(overrides: dict) -> None:
    # The config is the only contract between operator and trainer: the trainer's own parser
    # (unknown keys are an error there) must accept whatever the operator renders.
    from kubetune.trainer.config import parse_config

    spec = parse_spec(minimal_spec(**overrides))
    rendered = yaml.safe_load(render_trainer_config(QUICKSTART, spec, OperatorSettings()))
    parsed = parse_config(rendered)
    # Fields added to schema 1 later are rendered only when set; everything rendered must come
    # back unchanged from the trainer's resolved config.
    assert _restricted_to(parsed.to_document(), rendered) == rendered
    assert set(parsed.to_document()) - set(rendered) <= {"qualityGate"}


def _restricted_to(full: dict, shape: dict) -> dict:
    return {k: _restricted_to(full[k], v) if isinstance(v, dict) else full[k] for k, v in shape.items()}


def test_checkpoint_and_gate_fields_are_rendered_only_when_set() -> None:
    plain = build_trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings())
    assert plain["output"] == {"adapterUri": "s3://adapters/quickstart/"} and "qualityGate" not in plain
    spec = parse_spec(minimal_spec(
        dataset={"uri": "s3://datasets/t.jsonl", "validationSplit": 0.05},
        output={"adapterUri": "s3://adapters/q/", "checkpointUri": "s3://ckpt/q/", "checkpointEverySteps": 0},
        qualityGate={"maxEvalLoss": 1.5},
    ))
    config = build_trainer_config(QUICKSTART, spec, OperatorSettings())
    assert config["output"] == {"adapterUri": "s3://adapters/q/", "checkpointUri": "s3://ckpt/q/"}
    assert config["qualityGate"] == {"maxEvalLoss": 1.5}


def test_schedule_and_deepspeed_options_are_rendered_only_when_set() -> None:
    plain = build_trainer_config(QUICKSTART, parse_spec(minimal_spec()), OperatorSettings())
    assert plain["deepspeed"] == {"zeroStage": 2, "offload": "none"}
    assert not {"warmupSteps", "minLearningRate", "gradientCheckpointing", "gradientClipping"} & set(plain["training"])
    spec = parse_spec(minimal_spec(
        training={"warmupSteps": 10, "gradientCheckpointing": True},
        deepspeed={"config": {"zero_optimization": {"overlap_comm": True}}},
    ))
    config = build_trainer_config(QUICKSTART, spec, OperatorSettings())
    assert config["training"]["warmupSteps"] == 10 and config["training"]["gradientCheckpointing"] is True
    assert "gradientClipping" not in config["training"]
    assert config["deepspeed"]["config"] == {"zero_optimization": {"overlap_comm": True}}


def test_operator_and_trainer_refuse_the_same_deepspeed_keys() -> None:
    # The operator keeps its own copy (it never imports the trainer); they must not drift.
    from kubetune.operator.spec import DEEPSPEED_OWNED_KEYS
    from kubetune.trainer.schedule import OWNED_KEYS

    assert set(DEEPSPEED_OWNED_KEYS) == set(OWNED_KEYS)
    for key, field in OWNED_KEYS.items():
        assert DEEPSPEED_OWNED_KEYS[key] == "spec." + field.replace(" and training.", " and spec.training.")
