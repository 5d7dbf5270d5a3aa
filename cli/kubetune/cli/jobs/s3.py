"""S3 for the plugin: what a job published (adapter, manifest.json, loss.png) and the worker logs
it kept, read with boto3 (the ``cli`` extra: ``pip install 'kubetune[cli]'``).

Which endpoint: ``--s3-endpoint``, else boto's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
else the job's ``spec.storage.endpoint``, else the endpoint the operator gave its workers
(``status.launched.storageEndpoint``: the platform default a job without one used), else AWS.

Which credentials: boto's usual chain (environment, profile, instance role), or with
``--credentials-secret NAME`` the keys ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` of that
Secret in the job's namespace, read with the user's own kubectl rights (``get secrets``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from kubetune.cli.jobs.common import CommandError, Kubectl, job_namespace



def add_s3_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("S3 (boto3; credentials from the environment unless --credentials-secret)")
    group.add_argument("--s3-endpoint", metavar="URL",
                       help="S3 endpoint reachable from here (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, "
                            "the job's spec.storage.endpoint, else the one the operator gave the job)")
    group.add_argument("--credentials-secret", metavar="SECRET",
                       help="read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from this Secret in the job's "
                            "namespace (e.g. the job's spec.storage.credentialsSecret), with your kubectl rights")


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise CommandError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


@dataclass
class Store:
    """One boto3 client for a job's storage, with errors turned into CommandErrors that say
    what to check."""

    client: Any
    endpoint: str | None
    hint: str
    source: str = ""
    """Where the endpoint came from (a flag, the environment, the job), for error messages."""

    def get(self, uri: str) -> bytes | None:
        """The object's bytes; None when it does not exist."""
        bucket, key = parse_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:  # noqa: BLE001 - botocore's errors, imported lazily
            if _code(error) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self.explain(uri, error) from None

    def list(self, folder: str) -> list[str]:
        bucket, prefix = parse_uri(folder)
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        except Exception as error:  # noqa: BLE001
            raise self.explain(folder, error) from None
        return [f"s3://{bucket}/{key}" for key in keys]

    def download(self, uri: str, dest: Path) -> str:
        """Stream ``uri`` to ``dest``; its sha256."""
        bucket, key = parse_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            with dest.open("wb") as out:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except Exception as error:  # noqa: BLE001
            raise self.explain(uri, error) from None
        return digest.hexdigest()

    def explain(self, uri: str, error: Exception) -> CommandError:
        where = f" at {self.endpoint}{f' ({self.source})' if self.source else ''}" if self.endpoint else ""
        code = _code(error)
        if type(error).__name__ == "NoCredentialsError":
            return CommandError(f"no S3 credentials to read {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                                f"{self.hint}")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return CommandError(f"S3{where} refused to read {uri} ({code}): check the credentials{self.hint}")
        if code == "NoSuchBucket":
            return CommandError(f"S3{where} has no bucket for {uri} (NoSuchBucket): is --s3-endpoint right?")
        if type(error).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            return CommandError(f"cannot reach S3{where} to read {uri} ({error}); from outside the cluster pass "
                                "--s3-endpoint URL (or set AWS_ENDPOINT_URL_S3) with an endpoint reachable from here")
        return CommandError(f"S3{where}: {uri}: {error}")


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


def store_for(job: dict[str, Any], kubectl: Kubectl, args: argparse.Namespace) -> Store:
    """A client for the job's storage, per the module's rules on endpoint and credentials."""
    try:
        import boto3
        from botocore.config import Config
    except ModuleNotFoundError as error:
        raise CommandError(f"needs {error.name!r} for S3; install the CLI extra: pip install 'kubetune[cli]'") from None
    spec = job.get("spec") or {}
    storage = spec.get("storage") or {}
    endpoint, source = endpoint_for(job, args)
    secret = getattr(args, "credentials_secret", None)
    keys: dict[str, str] = {}
    if secret:
        keys = read_credentials_secret(kubectl, secret, job_namespace(job))
    job_secret = storage.get("credentialsSecret")
    hint = (f", or pass --credentials-secret {job_secret} (the job's Secret) to use its keys"
            if job_secret and not secret else "")
    checksums = storage.get("checksums") or "when_required"  # the job's setting, as its trainer used it
    client = boto3.client(
        "s3", endpoint_url=endpoint, region_name=storage.get("region") or os.environ.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=keys.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=keys.get("AWS_SESSION_TOKEN"),
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3},
                      request_checksum_calculation=checksums, response_checksum_validation=checksums,
                      connect_timeout=10, read_timeout=60),
    )
    return Store(client, endpoint, hint, source)


def endpoint_for(job: dict[str, Any], args: argparse.Namespace) -> tuple[str | None, str]:
    """(endpoint, where it came from), in the order the module describes."""
    if getattr(args, "s3_endpoint", None):
        return args.s3_endpoint, "--s3-endpoint"
    for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(variable):
            return os.environ[variable], variable
    storage = (job.get("spec") or {}).get("storage") or {}
    if storage.get("endpoint"):
        return storage["endpoint"], "the job's spec.storage.endpoint"
    resolved = ((job.get("status") or {}).get("launched") or {}).get("storageEndpoint")
    if resolved:
        return resolved, "the operator's default, from the job's status.launched.storageEndpoint"
    return None, ""


def read_credentials_secret(kubectl: Kubectl, secret: str, namespace: str) -> dict[str, str]:
    found = kubectl.run("get", "secret", secret, "-n", namespace, "-o", "json", check=False)
    if found.returncode != 0:
        raise CommandError(f"cannot read Secret {namespace}/{secret}: {found.stderr.strip()}")
    data = json.loads(found.stdout).get("data") or {}
    keys = {key: base64.b64decode(value).decode() for key, value in data.items()
            if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    missing = [key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key not in keys]
    if missing:
        raise CommandError(f"Secret {namespace}/{secret} has no {' or '.join(missing)}")
    return keys
