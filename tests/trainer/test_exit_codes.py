"""Which failures are bad input (a permanent exit code: the job fails at once) and which a
restart may cure (exit 1: the operator restarts the gang from the newest checkpoint), and how
the code reaches the operator: the process's exit status and the termination message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from kubetune.api.spec import Storage
from kubetune.api.termination import PERMANENT_EXIT_CODES, ExitCode, TerminationMessage
from kubetune.api.trainer_config import parse_config
from kubetune.trainer import termination
from kubetune.trainer.__main__ import main
from kubetune.trainer.errors import (
    AccessError,
    ConfigError,
    DataError,
    QualityGateError,
    Stopped,
    TrainerError,
)
from kubetune.trainer.s3 import download_file, make_client, put_bytes, upload_file

CONFIG = {
    "schemaVersion": 1,
    "model": {"uri": "s3://models/tiny-llama/"},
    "dataset": {"uri": "s3://datasets/quickstart/train.jsonl"},
    "output": {"adapterUri": "s3://adapters/quickstart/"},
}


def _client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       operation)


class StubClient:
    """Answers every request with ``error``, as an S3 endpoint in that state would; the bucket
    itself exists (HeadBucket succeeds) unless the error says otherwise."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def put_object(self, **_kwargs) -> None:
        raise self.error

    def upload_file(self, *_args, **_kwargs) -> None:
        # As boto3's transfer manager does: S3's answer re-raised as S3UploadFailedError.
        try:
            raise self.error
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload x to b/k: {exc}")  # noqa: B904 - boto3 chains implicitly

    def head_bucket(self, **_kwargs) -> None:
        if isinstance(self.error, ClientError) and self.error.response["Error"]["Code"] == "NoSuchBucket":
            raise _client_error("404", 404, "HeadBucket")


@pytest.mark.parametrize(("error", "exit_code"), [
    # Refusals and missing buckets or objects: a restart gets the same answer.
    (_client_error("AccessDenied", 403), ExitCode.NO_ACCESS),
    (_client_error("InvalidAccessKeyId", 403), ExitCode.NO_ACCESS),
    (_client_error("SignatureDoesNotMatch", 403), ExitCode.NO_ACCESS),
    (_client_error("NoSuchBucket", 404), ExitCode.NO_ACCESS),
    (_client_error("NoSuchKey", 404), ExitCode.NO_ACCESS),
    (NoCredentialsError(), ExitCode.NO_ACCESS),
    # What a retry may cure: the endpoint's trouble, throttling, the network, the node's clock.
    (_client_error("InternalError", 500), ExitCode.FAILED),
    (_client_error("ServiceUnavailable", 503), ExitCode.FAILED),
    (_client_error("SlowDown", 503), ExitCode.FAILED),
    (_client_error("RequestTimeout", 400), ExitCode.FAILED),
    (_client_error("RequestTimeTooSkewed", 403), ExitCode.FAILED),
    (_client_error("ExpiredToken", 403), ExitCode.FAILED),
    (EndpointConnectionError(endpoint_url="http://s3:9000"), ExitCode.FAILED),
    (ConnectTimeoutError(endpoint_url="http://s3:9000"), ExitCode.FAILED),
    (ReadTimeoutError(endpoint_url="http://s3:9000"), ExitCode.FAILED),
], ids=lambda value: value.response["Error"]["Code"] if isinstance(value, ClientError) else type(value).__name__)
def test_s3_failures_are_permanent_only_when_s3_refused_or_lacks_the_input(error: Exception, exit_code: int,
                                                                          tmp_path: Path) -> None:
    for attempt in (lambda client: put_bytes(client, b"x", "s3://bucket/k"),
                    lambda client: upload_file(client, tmp_path / "f", "s3://bucket/k")):
        with pytest.raises(TrainerError) as raised:
            attempt(StubClient(error))
        assert raised.value.exit_code == exit_code, raised.value
        assert (raised.value.exit_code in PERMANENT_EXIT_CODES) == (exit_code != ExitCode.FAILED)
        assert str(raised.value).startswith("s3://bucket/k: ")


def test_against_a_real_s3_a_missing_bucket_or_object_is_permanent(moto_endpoint: str, s3_client,
                                                                   tmp_path: Path, unused_port) -> None:
    client = make_client(Storage(endpoint=moto_endpoint))
    source = tmp_path / "a.txt"
    source.write_text("hello")
    with pytest.raises(AccessError, match="bucket 'no-such-upload-bucket' does not exist"):
        upload_file(client, source, "s3://no-such-upload-bucket/a.txt")  # boto3's S3UploadFailedError, unwrapped
    s3_client.create_bucket(Bucket="exit-codes")
    with pytest.raises(AccessError, match="no such object in bucket 'exit-codes'"):
        download_file(client, "s3://exit-codes/absent.jsonl", tmp_path / "x")

    dead = make_client(Storage(endpoint=f"http://127.0.0.1:{unused_port()}"))
    with pytest.raises(TrainerError, match="cannot reach the S3 endpoint") as raised:
        download_file(dead, "s3://exit-codes/absent.jsonl", tmp_path / "x")
    assert raised.value.exit_code == ExitCode.FAILED


def test_config_and_data_problems_carry_their_codes(tmp_path: Path) -> None:
    from kubetune.trainer.data import read_records
    from kubetune.trainer.train import gradient_accumulation_steps

    config = parse_config({**CONFIG, "training": {"microBatchSize": 4, "globalBatchSize": 32}})
    with pytest.raises(ConfigError) as raised:
        gradient_accumulation_steps(config, 3)
    assert raised.value.exit_code == ExitCode.INVALID_CONFIG

    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2: not valid JSON") as raised:
        read_records(path, config.dataset, source="s3://datasets/train.jsonl")
    assert raised.value.exit_code == ExitCode.INVALID_DATA


class FailingRecipe:
    """Stands in for the LoRA recipe: fails in setup with the error the test gives it."""

    error: BaseException

    def __init__(self, config) -> None:
        self.config = config

    def setup(self) -> None:
        raise self.error

    def cleanup(self) -> None:
        pass


@pytest.mark.parametrize(("error", "exit_code"), [
    (DataError("s3://datasets/t.jsonl line 2: not valid JSON"), 65),
    (AccessError("s3://models/x/: access denied to bucket 'models' (AccessDenied)"), 77),
    (ConfigError("training.globalBatchSize (32) must be a multiple of ..."), 78),
    (QualityGateError("eval loss 2.1000 > qualityGate.maxEvalLoss 0.5: adapter not published"), 79),
    (TrainerError("a collective operation found no answer from the other workers"), 1),
])
def test_the_entrypoint_exits_with_the_errors_code_and_leaves_it_in_the_termination_message(
    error: TrainerError, exit_code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = _in_a_pod(tmp_path, monkeypatch)
    recipe = type("Recipe", (FailingRecipe,), {"error": error})

    assert main(["--config", str(_config_file(tmp_path))], recipe=recipe) == exit_code

    assert capsys.readouterr().err == f"kubetune-trainer: error: {error}\n"
    message = TerminationMessage.parse(log.read_text())
    assert (message.outcome, message.error, message.exit_code) == ("Failed", str(error), exit_code)
    assert message.permanent == (exit_code != 1)


def test_a_stop_on_sigterm_exits_143_and_says_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    log = _in_a_pod(tmp_path, monkeypatch)
    stopped = Stopped(7, 12, "with a checkpoint (s3://ckpt/job/step-7/): a restart resumes from it")
    recipe = type("Recipe", (FailingRecipe,), {"error": stopped})

    assert main(["--config", str(_config_file(tmp_path))], recipe=recipe) == 143

    assert capsys.readouterr().err.startswith("kubetune-trainer: stopped: stopped on SIGTERM at step 7 with")
    assert json.loads(log.read_text()) == {
        "outcome": "Failed", "exitCode": 143, "steps": 7, "totalSteps": 12,
        "error": "stopped on SIGTERM at step 7 with a checkpoint (s3://ckpt/job/step-7/): a restart resumes from it"}
    assert not TerminationMessage.parse(log.read_text()).permanent


def test_a_stop_on_sigterm_keeps_the_message_another_rank_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun stops the survivors with SIGTERM when a worker fails: that worker's reason stays.
    log = _in_a_pod(tmp_path, monkeypatch)
    earlier = termination.failure_message("a collective operation found no answer from the other workers")
    log.write_text(earlier)
    recipe = type("Recipe", (FailingRecipe,), {"error": Stopped(2, 6, "without a checkpoint")})

    assert main(["--config", str(_config_file(tmp_path))], recipe=recipe) == 143
    assert log.read_text() == earlier

    # Any other ending is this rank's own news and replaces what is there.
    recipe = type("Recipe", (FailingRecipe,), {"error": DataError("line 2: not valid JSON")})
    assert main(["--config", str(_config_file(tmp_path))], recipe=recipe) == 65
    assert TerminationMessage.parse(log.read_text()).error == "line 2: not valid JSON"


def test_a_config_that_does_not_load_is_invalid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _in_a_pod(tmp_path, monkeypatch)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "training": {"learningrate": 0.1}}))

    assert main(["--config", str(path)]) == ExitCode.INVALID_CONFIG
    message = TerminationMessage.parse(log.read_text())
    assert message.exit_code == 78 and "training.learningrate: unknown field" in message.error


def _in_a_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(termination.PATH_ENV, str(log))
    return log


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_a_download_that_fails_while_the_process_starts_up_ends_the_job_with_its_own_error(
    moto_endpoint: str, s3_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unused_port,
) -> None:
    """The downloads run in a thread while the process joins its peers and imports the model
    libraries: what they raise is still the job's error, with its code, and the process leaves
    its group and its scratch folder."""
    import torch

    from kubetune.trainer.train import run

    s3_client.create_bucket(Bucket="not-a-model")
    s3_client.put_object(Bucket="not-a-model", Key="base/model.safetensors", Body=b"weights only")
    s3_client.put_object(Bucket="not-a-model", Key="train.jsonl", Body=b'{"text": "one"}\n')
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(unused_port()), "KUBETUNE_WORKDIR": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    config = parse_config({**CONFIG, "model": {"uri": "s3://not-a-model/base/"},
                           "dataset": {"uri": "s3://not-a-model/train.jsonl"},
                           "storage": {"endpoint": moto_endpoint}, "metrics": {"port": 0}})

    with pytest.raises(ConfigError, match=r"s3://not-a-model/base/ has no config\.json") as raised:
        run(config)
    assert raised.value.exit_code == ExitCode.INVALID_CONFIG
    assert not torch.distributed.is_initialized()
    assert not any((tmp_path / "kubetune").glob("*/node-0")), list(tmp_path.rglob("*"))
