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

CHECK_ORDER = ["credentials", "model", "dataset", "chat template", "validation", "retention", "adapterUri",
               "checkpointUri"]


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
        evaluation={"retentionUri": uploaded_assets["retention"]},
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
    # Read as plain text whatever the training format is.
    assert "40 lines parse as format text, 40 examples to evaluate for retention" in line_of(lines, "retention")
    assert "llama config" in line_of(lines, "model")
    assert not termination_log.exists()  # a passing preflight leaves the message to the trainer
    assert line_of(lines, "adapterUri").startswith(
        "ok adapterUri: staged, copied and deleted a probe object under s3://adapters/preflight.staging-")
    # No probe left: not in either folder, not in the staging prefix beside adapterUri.
    left = s3_client.list_objects_v2(Bucket="adapters", Prefix="preflight").get("Contents", [])
    assert left == [], left


def test_a_bad_jsonl_line_fails_with_its_line_number_and_exit_80(
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
    assert result.returncode == 80, result.stdout + result.stderr  # ExitCode.PREFLIGHT_FAILED
    lines = result.stdout.strip().splitlines()
    assert line_of(lines, "dataset") == f"FAIL dataset: {uri} line 3: not valid JSON (Expecting ',' delimiter)"
    # The other checks still ran and passed: the report lists everything to fix at once.
    assert [line.split(":")[0] for line in lines if line.startswith("ok")] == [
        "ok credentials", "ok model", "ok validation", "ok adapterUri"]
    assert json.loads(termination_log.read_text()) == {
        "outcome": "Failed", "exitCode": 80,
        "error": f"preflight: FAIL dataset: {uri} line 3: not valid JSON (Expecting ',' delimiter)"}


def test_every_failure_is_in_the_termination_message(
    uploaded_assets: dict[str, str], s3_env: dict[str, str], moto_endpoint: str, s3_client, tmp_path: Path,
) -> None:
    uri = upload(s3_client, "preflight/bad-too.jsonl", '{"text": "one"}\nnot json\n')
    s3_client.put_object(Bucket="adapters", Key="taken/manifest.json", Body=json.dumps(
        {"job": {"namespace": "team-a", "name": "first", "uid": "uid-first"}}).encode())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(job(uploaded_assets, moto_endpoint, job={"name": "second", "uid": "uid-second"},
                                       dataset={"uri": uri},
                                       output={"adapterUri": "s3://adapters/taken/",
                                               "checkpointUri": "s3://no-such-checkpoints/second/"})))
    termination_log = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "kubetune.trainer", "--preflight", "--config", str(path)],
        env={**s3_env, "KUBETUNE_TERMINATION_LOG": str(termination_log)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 80, result.stdout + result.stderr
    failed = [line for line in result.stdout.strip().splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failed] == ["FAIL dataset", "FAIL adapterUri", "FAIL checkpointUri"]
    summary = json.loads(termination_log.read_text())
    assert summary == {"outcome": "Failed", "exitCode": 80, "error": "preflight: " + "; ".join(failed)}


def test_the_termination_message_keeps_to_4096_bytes_however_many_lines_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import kubetune.trainer.preflight as preflight_module
    from kubetune.trainer.__main__ import main
    from kubetune.trainer.preflight import CheckResult

    def many_failures(_config, report):
        results = [CheckResult(f"check {i}", False, "x" * 300) for i in range(30)]
        for result in results:
            report(result.line())
        return results

    monkeypatch.setattr(preflight_module, "run_preflight", many_failures)
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(job({"model": "s3://models/m/", "train": "s3://datasets/t.jsonl"}, None)))

    assert main(["--preflight", "--config", str(path)]) == 80
    text = (tmp_path / "termination-log").read_text()
    assert len(text.encode()) <= 4096
    summary = json.loads(text)
    assert summary["exitCode"] == 80 and summary["error"].startswith(
        f"preflight: FAIL check 0: {'x' * 300}; FAIL check 1: {'x' * 300}; FAIL check 2: ")
    assert summary["error"].endswith("...")


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
    assert line_of(lines, "adapterUri").startswith(
        "ok adapterUri: staged, copied and deleted a probe object under s3://adapters/ok.staging-")
    assert line_of(lines, "adapterUri").endswith("/ and s3://adapters/ok/")
    failed = line_of(lines, "checkpointUri")
    assert failed.startswith("FAIL checkpointUri: output.checkpointUri is not writable: s3://no-such-checkpoints/job/")
    assert failed.endswith("bucket 'no-such-checkpoints' does not exist: create it or fix the URI")


OTHER_JOBS_MANIFEST = {"manifestVersion": 1, "job": {"namespace": "team-a", "name": "first", "uid": "uid-first"}}


@pytest.mark.parametrize(("job_uid", "overwrite", "expected"), [
    ("uid-second", False,
     "FAIL adapterUri: spec.output.adapterUri s3://adapters/published/ already holds a published adapter "
     "(manifest.json of job team-a/first uid uid-first); set spec.output.overwrite: true to replace it, or "
     "choose another adapterUri"),
    ("uid-second", True, "; publishing replaces the adapter published there (manifest.json of job team-a/first "
                         "uid uid-first)"),
    ("uid-first", False, "; publishing replaces the adapter published there (by this job)"),  # a restarted job
])
def test_an_adapter_uri_holding_another_jobs_adapter_fails_unless_overwrite_or_the_same_job(
    job_uid: str, overwrite: bool, expected: str, uploaded_assets: dict[str, str], moto_endpoint: str, s3_client,
) -> None:
    s3_client.put_object(Bucket="adapters", Key="published/manifest.json",
                         Body=json.dumps(OTHER_JOBS_MANIFEST).encode())
    lines = preflight(job(uploaded_assets, moto_endpoint, job={"name": "second", "uid": job_uid},
                          output={"adapterUri": "s3://adapters/published/", "overwrite": overwrite}))
    adapter = line_of(lines, "adapterUri")
    if expected.startswith("FAIL"):
        assert adapter == expected
    else:
        assert adapter.startswith("ok adapterUri: staged, copied and deleted") and adapter.endswith(expected), adapter
    assert s3_client.get_object(Bucket="adapters", Key="published/manifest.json")["Body"].read() == json.dumps(
        OTHER_JOBS_MANIFEST).encode()  # preflight never changes it


def test_an_adapter_uri_at_a_bucket_root_is_probed_inside_that_bucket(
    uploaded_assets: dict[str, str], moto_endpoint: str, s3_client,
) -> None:
    s3_client.create_bucket(Bucket="preflight-root")
    buckets = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    lines = preflight(job(uploaded_assets, moto_endpoint, output={"adapterUri": "s3://preflight-root/"}))
    assert line_of(lines, "adapterUri").startswith(
        "ok adapterUri: staged, copied and deleted a probe object under s3://preflight-root/.kubetune-staging-")
    assert s3_client.list_objects_v2(Bucket="preflight-root").get("Contents", []) == []
    assert {b["Name"] for b in s3_client.list_buckets()["Buckets"]} == buckets


def test_credentials_that_may_write_adapter_uri_but_not_its_staging_prefix_fail(
    tiny_assets: Path, own_moto_endpoint: str,
) -> None:
    """An IAM policy scoped to exactly adapterUri/*: the old probe (one object under adapterUri)
    passed, and the job then failed when publishing into the staging prefix beside it."""
    import boto3
    import requests

    from kubetune.api.spec import Storage
    from kubetune.trainer.s3 import make_client
    from kubetune.trainer.tiny import upload_demo_assets

    endpoint = own_moto_endpoint
    # From now on moto checks signatures and IAM policies, after 3 requests creating the admin.
    requests.post(f"{endpoint}/moto-api/reset-auth", data="3", timeout=10).raise_for_status()
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="unused", aws_secret_access_key="unused")
    admin = _iam_user(iam, "admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **admin)
    assets = upload_demo_assets(endpoint, access_key=admin["aws_access_key_id"],
                                secret_key=admin["aws_secret_access_key"], assets_dir=tiny_assets)
    readable = [f"arn:aws:s3:::{bucket}{tail}" for bucket in ("models", "datasets") for tail in ("", "/*")]
    scoped = [{"Effect": "Allow", "Action": "s3:*", "Resource": readable},
              {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::adapters"},
              {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::adapters/scoped/*"}]
    writer = _iam_user(iam, "writer", scoped)
    # The writer's keys given to the client: boto3's default session keeps the first keys it
    # read from the environment, whichever test that was.
    client = make_client(Storage(endpoint=endpoint), access_key=writer["aws_access_key_id"],
                         secret_key=writer["aws_secret_access_key"])
    config = parse_config(job(assets, endpoint, output={"adapterUri": "s3://adapters/scoped/"}))

    def adapter_line() -> str:
        lines: list[str] = []
        run_preflight(config, report=lines.append, client=client)
        assert line_of(lines, "credentials").startswith("ok credentials:"), lines
        return line_of(lines, "adapterUri")

    adapter = adapter_line()
    assert adapter.startswith("FAIL adapterUri: output.adapterUri is not writable where the adapter is staged "
                              "(s3://adapters/scoped.staging-"), adapter
    assert adapter.endswith("access denied to bucket 'adapters' (AccessDenied): check the credentials in "
                            "storage.credentialsSecret and the bucket policy"), adapter

    # Allowed beside it as well (adapters/scoped*), the same credentials pass.
    scoped[-1]["Resource"] = "arn:aws:s3:::adapters/scoped*"
    iam.put_user_policy(UserName="writer", PolicyName="access", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": scoped}))
    assert adapter_line().startswith("ok adapterUri: staged, copied and deleted")


def _iam_user(iam, name: str, statements: list[dict]) -> dict[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="access",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
