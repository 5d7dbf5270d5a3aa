"""``kubetune trainer --preflight``: check a job's inputs and outputs on CPU before training.

It runs before any GPU is held and without torch.distributed (the operator will run it as an
init container of the workers), so a typo in a field name, a bad line in the dataset or a
read-only output bucket costs seconds on a CPU instead of a GPU node's start-up and download.

Checks, in order, one line each, ``ok|FAIL <check>: <detail>``:

  credentials     one cheap S3 call (list the model folder) with the pod's credentials
  model           config.json parses with AutoConfig, the tokenizer loads, weights are present
                  (only the small files are downloaded, never the weights)
  dataset         the whole file parses and tokenises per dataset.format and its field settings
                  (first bad line or row number), with at least one example left to train on
  chat template   format chat only: the tokenizer has one
  validation      validationUri, when set, passes the same checks as the dataset
  adapterUri      no other job's adapter is published there (a manifest.json of another job
                  uid, unless output.overwrite), and the publisher's own requests work where
                  it makes them: a probe object written under the staging prefix publish.py
                  uses, copied server-side into adapterUri, read back and both deleted
  checkpointUri   a probe object can be written and deleted under output.checkpointUri, when set

A check that needs an earlier one (the dataset needs the tokenizer) reports what it could
check without it. Every problem is a :class:`TrainerError` naming the field to fix. Any FAIL
makes ``--preflight`` exit 80 (ExitCode.PREFLIGHT_FAILED) with every FAIL line in the
termination message.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import ConfigError, TrainerError
from kubetune.trainer.s3 import (
    copy_object, delete_object, delete_prefix, download_file, head, join_uri, list_keys, make_client, parse_s3_uri,
    put_bytes,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from kubetune.api.spec import Dataset
    from kubetune.api.trainer_config import TrainerConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
"""Model files preflight never downloads: they are the bulk of the folder and need no parse."""

PROBE_PREFIX = ".kubetune-preflight-"
PROBE_BODY = b"kubetune preflight probe; safe to delete\n"


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL'} {self.name}: {self.detail}"


class _Run:
    """The state the checks share: the S3 client, the scratch folder, the loaded tokenizer."""

    def __init__(self, config: TrainerConfig, client: S3Client, scratch: Path) -> None:
        self.config, self.client, self.scratch = config, client, scratch
        self.model_keys: list[str] | None = None
        self.tokenizer: Any = None


def run_preflight(config: TrainerConfig, *, report: Callable[[str], None] = print,
                  client: S3Client | None = None) -> list[CheckResult]:
    """Run every check in order, passing each line to ``report`` as it is known."""
    results: list[CheckResult] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-preflight-") as scratch:
        state = _Run(config, client or make_client(config.storage), Path(scratch))
        for name, check in _checks(config):
            if name != "credentials" and results and not results[0].ok:
                result = CheckResult(name, False, "not checked: S3 could not be used with these credentials (see the credentials line)")
            else:
                try:
                    result = CheckResult(name, True, check(state))
                except TrainerError as exc:
                    result = CheckResult(name, False, str(exc))
            results.append(result)
            report(result.line())
    return results


def _checks(config: TrainerConfig) -> list[tuple[str, Callable[[_Run], str]]]:
    checks: list[tuple[str, Callable[[_Run], str]]] = [
        ("credentials", _check_credentials),
        ("model", _check_model),
        ("dataset", _check_dataset),
    ]
    if config.dataset.format == "chat":
        checks.append(("chat template", _check_chat_template))
    checks.append(("validation", _check_validation))
    if config.evaluation.retention_uri:
        checks.append(("retention", _check_retention))
    checks.append(("adapterUri", _check_adapter_uri))
    if config.output.checkpoint_uri:
        checks.append(("checkpointUri",
                       lambda state: _check_writable(state, state.config.output.checkpoint_uri, "output.checkpointUri")))
    return checks


def _check_credentials(state: _Run) -> str:
    storage, uri = state.config.storage, state.config.model.uri
    where = storage.endpoint or f"AWS S3 ({storage.region})"
    try:
        state.model_keys = list_keys(state.client, uri)
    except TrainerError:
        # S3 authenticates a request before it looks for the bucket: "no such bucket" means
        # the credentials were accepted, and the model line reports the missing bucket.
        bucket = parse_s3_uri(uri)[0]
        if _bucket_status(state.client, bucket) != 404:
            raise
        return f"{where} accepted them (model.uri's bucket {bucket!r} does not exist: see the model line)"
    return f"{where} accepted them (listed {uri})"


def _bucket_status(client: S3Client, bucket: str) -> int | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    except BotoCoreError:
        return None
    return 200


def _check_model(state: _Run) -> str:
    from transformers import AutoConfig, AutoTokenizer

    uri = state.config.model.uri
    keys = state.model_keys if state.model_keys is not None else list_keys(state.client, uri)
    if "config.json" not in keys:
        found = f"found: {sorted(keys)[:8]}" if keys else "the folder is empty"
        raise ConfigError(
            f"{uri} has no config.json ({found}): model.uri must be a folder written by save_pretrained "
            "(config.json, tokenizer files, weights)"
        )
    weights = [key for key in keys if key.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise ConfigError(f"{uri} has no weight files (*.safetensors or *.bin): upload the model's weights there")
    model_dir = state.scratch / "model"
    for key in keys:
        if key and not key.endswith("/") and not key.endswith(WEIGHT_SUFFIXES):
            download_file(state.client, join_uri(uri, key), model_dir / key)
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{uri}config.json: transformers cannot read it ({_first_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{uri}: the tokenizer does not load ({_first_line(exc)}); upload the files save_pretrained "
            "writes for the tokenizer (tokenizer.json, tokenizer_config.json)"
        ) from None
    state.tokenizer = tokenizer
    return (f"{model_config.model_type} config, tokenizer with {len(tokenizer)} tokens, "
            f"{len(weights)} weight file(s)")


def _check_dataset(state: _Run) -> str:
    return _check_data_file(state, state.config.dataset.uri)


def _check_validation(state: _Run) -> str:
    dataset = state.config.dataset
    if dataset.validation_uri:
        return _check_data_file(state, dataset.validation_uri)
    if dataset.validation_split > 0:
        return f"{dataset.validation_split:g} of the dataset is held out (dataset.validationSplit)"
    return "none (no dataset.validationSplit or validationUri: the job reports no eval loss)"


def _check_retention(state: _Run) -> str:
    from kubetune.trainer.data import retention_dataset

    evaluation = state.config.evaluation
    return _check_data_file(state, evaluation.retention_uri, retention_dataset(evaluation),
                            purpose="evaluate for retention")


def _check_data_file(state: _Run, uri: str, dataset: Dataset | None = None, purpose: str = "train on") -> str:
    """Download ``uri`` and run the trainer's own readers over all of it (as ``dataset`` says,
    by default the training data's settings)."""
    from kubetune.trainer import data

    dataset, training = dataset or state.config.dataset, state.config.training
    path = download_file(state.client, uri, state.scratch / "data" / uuid.uuid4().hex)
    records, unit = data.read_records(path, dataset, source=uri)
    if state.tokenizer is None:
        return f"{len(records)} {unit}s parse (fields not checked: the model's tokenizer did not load)"
    if dataset.format == "chat" and not state.tokenizer.chat_template:
        for number, record in records:  # what can be checked without a template: the messages
            data._messages_field(record, dataset.messages_field, f"{uri} {unit} {number}")
        return f"{len(records)} {unit}s parse (not tokenised: the tokenizer has no chat template)"
    examples = data.tokenize_records(records, state.tokenizer, dataset, source=uri, unit=unit)
    kept, notes = data.fit_to_length(examples, training.sequence_length, dataset.overlong, dataset.format, source=uri)
    detail = f"{len(records)} {unit}s parse as format {dataset.format}, {len(kept)} examples to {purpose}"
    return detail + "".join(f"; {note.removeprefix(uri + ': ')}" for note in notes)


def _check_chat_template(state: _Run) -> str:
    if state.tokenizer is None:
        raise TrainerError("not checked: the model's tokenizer did not load (see the model line)")
    if not state.tokenizer.chat_template:
        raise ConfigError(
            f"dataset.format is chat but the tokenizer in {state.config.model.uri} has no chat template: add "
            "chat_template to its tokenizer_config.json, or use dataset.format text or instruction"
        )
    return "the tokenizer has one"


def _check_adapter_uri(state: _Run) -> str:
    """Another job's adapter first (the likelier mistake), then the publisher's requests."""
    from kubetune.trainer.publish import check_may_publish, staging_uri

    uri = state.config.output.adapter_uri
    replaces = check_may_publish(state.client, state.config)
    staging = staging_uri(uri)
    staged, published = join_uri(staging, _probe_name()), join_uri(uri, _probe_name())
    try:
        # As publish_adapter does: upload to staging, copy server-side, HEAD, delete both.
        put_bytes(state.client, PROBE_BODY, staged)
        copy_object(state.client, staged, published)
        head(state.client, published)
        delete_prefix(state.client, staging)
        delete_object(state.client, published)
    except TrainerError as exc:
        raise type(exc)(f"output.adapterUri is not writable where the adapter is staged ({staging}) "
                        f"or published: {exc}") from None
    detail = f"staged, copied and deleted a probe object under {staging} and {uri}"
    return detail + (f"; publishing {replaces}" if replaces else "")


def _check_writable(state: _Run, folder_uri: str, setting: str) -> str:
    probe = join_uri(folder_uri, _probe_name())
    try:
        put_bytes(state.client, PROBE_BODY, probe)
        delete_object(state.client, probe)
    except TrainerError as exc:
        raise type(exc)(f"{setting} is not writable: {exc}") from None
    return f"wrote and deleted a probe object under {folder_uri}"


def _probe_name() -> str:
    return f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
