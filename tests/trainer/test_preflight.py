"""`kubetune trainer --preflight`: what a user sees for a good job and for each kind of mistake,
against a real S3 server (moto)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.api.trainer_config import parse_config
from kubetune.trainer.preflight import run_preflight

CHECK_ORDER = ["credentials", "model", "dataset", "chat template", "validation", "adapterUri", "checkpointUri"]


def job(uploaded_assets: dict[str, str], endpoint: str, **sections: dict) -> dict:
    doc = {
        "schemaVersion": 1,
        "job": {"name": "preflight"},
        "model": {"uri": uploaded_assets["model"]},
        "dataset": {"uri": uploaded_assets["train"], "format": "text", "validationSplit": 0.1},
        "training": {"sequenceLength": 64},
        "output": {"adapterUri": "s3://adapters/preflight/"},
        "storage": {"endpoint": endpoint},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return doc


def preflight(doc: dict) -> list[str]:
    lines: list[str] = []
    run_preflight(parse_config(doc), report=lines.append)
    return lines


def line_of(lines: list[str], check: str) -> str:
    [found] = [line for line in lines if line.split(" ", 1)[1].startswith(check + ":")]
    return found


def upload(s3_client, key: str, body: str) -> str:
    s3_client.put_object(Bucket="datasets", Key=key, Body=body.encode())
    return f"s3://datasets/{key}"


def test_a_good_chat_job_passes_every_check_in_order_and_leaves_no_probe(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client, tmp_path: Path,
) -> None:
    doc = job(
        uploaded_assets, moto_endpoint,
        dataset={"uri": uploaded_assets["chat"], "format": "chat", "validationSplit": 0.0,
                 "validationUri": uploaded_assets["chat"]},
        output={"checkpointUri": "s3://adapters/preflight-checkpoints/"},
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    termination_log = tmp_path / "termination-log"
    kubetune = Path(sys.executable).with_name("kubetune")
    result = subprocess.run(
        [str(kubetune), "trainer", "--preflight", "--config", str(path)],
        env={**s3_env, "KUBETUNE_TERMINATION_LOG": str(termination_log)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"ok {check}" for check in CHECK_ORDER], lines
    assert "240 lines parse as format chat, 240 examples to train on" in line_of(lines, "dataset")
    assert "llama config" in line_of(lines, "model")
    assert not termination_log.exists()  # a passing preflight leaves the message to the trainer
    for prefix in ("preflight/", "preflight-checkpoints/"):
        left = s3_client.list_objects_v2(Bucket="adapters", Prefix=prefix).get("Contents", [])
        assert left == [], left


def test_a_bad_jsonl_line_fails_with_its_line_number_and_exit_1(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client, tmp_path: Path,
) -> None:
    uri = upload(s3_client, "preflight/bad.jsonl", '{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(job(uploaded_assets, moto_endpoint, dataset={"uri": uri})))
    termination_log = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--preflight", "--config", str(path)],
        env={**s3_env, "KUBETUNE_TERMINATION_LOG": str(termination_log)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert line_of(lines, "dataset") == f"FAIL dataset: {uri} line 3: not valid JSON (Expecting ',' delimiter)"
    # The other checks still ran and passed: the report lists everything to fix at once.
    assert [line.split(":")[0] for line in lines if line.startswith("ok")] == [
        "ok credentials", "ok model", "ok validation", "ok adapterUri"]
    assert json.loads(termination_log.read_text()) == {
        "outcome": "Failed", "error": f"preflight: FAIL dataset: {uri} line 3: not valid JSON (Expecting ',' delimiter)"}


def test_a_missing_field_names_the_setting_to_change(
    uploaded_assets: dict[str, str], moto_endpoint: str, s3_client,
) -> None:
    doc = job(uploaded_assets, moto_endpoint,
              dataset={"uri": uploaded_assets["instruction"], "format": "instruction", "promptField": "question"})
    lines = preflight(doc)
    dataset = line_of(lines, "dataset")
    assert dataset.startswith(f"FAIL dataset: {uploaded_assets['instruction']} line 1: field 'question' is missing")
    assert "set dataset.promptField to the key that holds it; keys present: ['prompt', 'response']" in dataset


def test_format_chat_without_a_template_fails_the_chat_template_check(
    uploaded_assets: dict[str, str], moto_endpoint: str, s3_client, tiny_assets: Path,
) -> None:
    # The demo model without its chat template (transformers saves it as chat_template.jinja).
    for path in sorted((tiny_assets / "tiny-llama").iterdir()):
        if path.name != "chat_template.jinja":
            s3_client.put_object(Bucket="models", Key=f"no-template/{path.name}", Body=path.read_bytes())
    lines = preflight(job(uploaded_assets, moto_endpoint, model={"uri": "s3://models/no-template/"},
                          dataset={"uri": uploaded_assets["chat"], "format": "chat"}))
    assert line_of(lines, "dataset") == (
        "ok dataset: 240 lines parse (not tokenised: the tokenizer has no chat template)")
    assert line_of(lines, "chat template").startswith(
        "FAIL chat template: dataset.format is chat but the tokenizer in s3://models/no-template/ has no chat template")


def test_wrong_credentials_fail_first_and_skip_the_rest(
    uploaded_assets: dict[str, str], strict_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    lines = preflight(job(uploaded_assets, strict_moto_endpoint))
    assert lines[0] == (
        f"FAIL credentials: {uploaded_assets['model']}: access denied to bucket 'models' (InvalidAccessKeyId): "
        "check the credentials in storage.credentialsSecret and the bucket policy"
    )
    assert lines[1:] == [
        f"FAIL {check}: not checked: S3 could not be used with these credentials (see the credentials line)"
        for check in ["model", "dataset", "validation", "adapterUri"]
    ]


def test_a_missing_model_bucket_is_reported_on_the_model_line(
    uploaded_assets: dict[str, str], moto_endpoint: str, s3_client,
) -> None:
    lines = preflight(job(uploaded_assets, moto_endpoint, model={"uri": "s3://no-such-models/llama/"}))
    assert line_of(lines, "credentials").startswith("ok credentials:")
    assert line_of(lines, "model") == (
        "FAIL model: s3://no-such-models/llama/: bucket 'no-such-models' does not exist: create it or fix the URI")
    assert line_of(lines, "dataset") == (
        "ok dataset: 240 lines parse (fields not checked: the model's tokenizer did not load)")


def test_an_output_bucket_that_does_not_exist_is_not_writable(
    uploaded_assets: dict[str, str], moto_endpoint: str, s3_client,
) -> None:
    lines = preflight(job(uploaded_assets, moto_endpoint,
                          output={"adapterUri": "s3://adapters/ok/", "checkpointUri": "s3://no-such-checkpoints/job/"}))
    assert line_of(lines, "adapterUri") == "ok adapterUri: wrote and deleted a probe object under s3://adapters/ok/"
    failed = line_of(lines, "checkpointUri")
    assert failed.startswith("FAIL checkpointUri: output.checkpointUri is not writable: s3://no-such-checkpoints/job/")
    assert failed.endswith("bucket 'no-such-checkpoints' does not exist: create it or fix the URI")
