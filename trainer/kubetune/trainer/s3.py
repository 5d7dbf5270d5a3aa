"""S3 access for the trainer: one boto3 client, download a prefix or a file, upload a file.

Credentials come from boto3's standard chain (in a pod: the env vars ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` from the job's credentialsSecret). Every failure is turned into a
:class:`TrainerError` that names the URI, the bucket and what to check: an :class:`AccessError`
(permanent, exit 77) when S3 refused the credentials or a bucket or key does not exist, a
plain TrainerError (transient, exit 1) for what a retry may cure (no connection, timeouts,
5xx, throttling).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError, ClientError, EndpointConnectionError, IncompleteReadError, NoCredentialsError, ReadTimeoutError,
    ResponseStreamingError,
)

from kubetune.trainer.errors import AccessError, ConfigError, TrainerError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # only for editors; not a runtime dependency

    from kubetune.api.spec import Storage


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; key may be empty or end with "/"."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"{uri!r} is not an S3 URI: expected s3://<bucket>/<key>")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if len(bucket) < 3:
        raise ConfigError(
            f"{uri!r} has no valid bucket name ({bucket!r}): expected s3://<bucket>/<key> with a "
            "bucket of at least 3 characters"
        )
    return bucket, key


def make_client(storage: Storage, *, access_key: str | None = None, secret_key: str | None = None,
                connect_timeout: float = 10, read_timeout: float = 120) -> S3Client:
    """A boto3 S3 client for ``storage``: path-style addressing (works with MinIO, moto and
    in-cluster Services whose names are not DNS wildcards) and boto's standard retry mode.
    Credentials come from boto's usual chain (in a pod: the Secret's env vars) unless given.
    Checksums per ``storage.checksums`` (spec.py says why "when_required" is the default).
    The timeouts are seconds per connection attempt and per read (tests shorten them)."""
    return boto3.client(
        "s3",
        endpoint_url=storage.endpoint,
        region_name=storage.region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 5},
            request_checksum_calculation=storage.checksums,
            response_checksum_validation=storage.checksums,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        ),
    )


def download_file(client: S3Client, uri: str, dest: Path) -> Path:
    """Download the object at ``uri`` to the file ``dest`` (parents created)."""
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise ConfigError(f"{uri!r} names a folder; expected the URI of one object")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _explained(uri, bucket, client):
        client.download_file(bucket, key, str(dest))
    return dest


def download_prefix(client: S3Client, uri: str, dest_dir: Path) -> list[Path]:
    """Download every object under the folder ``uri`` into ``dest_dir``, keeping sub-paths.

    Raises if the prefix holds no object, since an empty model folder is always a mistake.
    """
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    written: list[Path] = []
    with _explained(uri, bucket, client):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix):]
                if not relative or relative.endswith("/"):
                    continue  # folder marker objects some tools create
                target = dest_dir.joinpath(*PurePosixPath(relative).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with _explained(f"s3://{bucket}/{obj['Key']}", bucket, client):  # errors name the object
                    client.download_file(bucket, obj["Key"], str(target))
                written.append(target)
    if not written:
        raise AccessError(
            f"no objects under {uri}: check the URI (bucket {bucket!r}, prefix {prefix!r}) and "
            "that the upload finished"
        )
    return written


def upload_file(client: S3Client, path: Path, uri: str, *, metadata: dict[str, str] | None = None) -> None:
    """Upload the local file ``path`` to the object ``uri`` (with user ``metadata``, if any)."""
    bucket, key = parse_s3_uri(uri)
    with _explained(uri, bucket, client):
        if metadata:
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": metadata})
        else:
            client.upload_file(str(path), bucket, key)


def put_bytes(client: S3Client, data: bytes, uri: str) -> None:
    """Write a small object (a marker, a manifest) in one request."""
    bucket, key = parse_s3_uri(uri)
    with _explained(uri, bucket, client):
        client.put_object(Bucket=bucket, Key=key, Body=data)


def get_bytes(client: S3Client, uri: str) -> bytes | None:
    """The body of a small object (a manifest), None if there is no such object."""
    found = get_object(client, uri)
    return None if found is None else found.body


@dataclass(frozen=True)
class Stored:
    """A small object as read: its bytes, its ETag and how long ago it was written."""

    body: bytes
    etag: str
    age: float
    """Seconds since it was last written, by the S3 server's clock (its Date and Last-Modified
    headers: a skewed node clock does not matter)."""


BODY_ATTEMPTS = 3
"""Reads of a small object's body: botocore retries a request until its headers arrive, not a
body cut short after them (a reset, a read timeout, fewer bytes than Content-Length)."""


def get_object(client: S3Client, uri: str) -> Stored | None:
    """A small object (a manifest, a lock), None if there is no such object."""
    bucket, key = parse_s3_uri(uri)
    attempt = 1
    with _explained(uri, bucket, client):
        while True:
            try:
                response = client.get_object(Bucket=bucket, Key=key)
                body = response["Body"].read()
                break
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404 and exc.response.get(
                        "Error", {}).get("Code") != "NoSuchBucket":
                    return None
                raise
            except (ReadTimeoutError, IncompleteReadError, ResponseStreamingError):
                if attempt == BODY_ATTEMPTS:
                    raise
                attempt += 1
    date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.now(UTC)
    return Stored(body, response["ETag"], (now - response["LastModified"]).total_seconds())


def head(client: S3Client, uri: str) -> dict | None:
    """The object's HEAD response (size in ``ContentLength``, user ``Metadata``), None if absent."""
    bucket, key = parse_s3_uri(uri)
    with _explained(uri, bucket, client):
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise


class ConditionalWritesUnsupported(TrainerError):
    """The S3 endpoint answered 501 NotImplemented to a conditional write (If-None-Match or
    If-Match on PutObject): an S3-compatible store that predates them."""


def put_if(client: S3Client, data: bytes, uri: str, *, etag: str | None) -> str | None:
    """Write a small object only if it does not exist (``etag`` None: If-None-Match: *) or is
    still the version with that ETag (If-Match); its new ETag, or None when the condition
    failed (412 PreconditionFailed; 409 ConditionalRequestConflict: a concurrent conditional
    write). AWS S3 has had both since 2024, as have MinIO, Ceph RGW and moto."""
    bucket, key = parse_s3_uri(uri)
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    with _explained(uri, bucket, client):
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if status == 501 or code == "NotImplemented":
                raise ConditionalWritesUnsupported(
                    f"{uri}: the S3 endpoint does not implement conditional writes ({code or status})") from None
            raise


def copy_object(client: S3Client, source_uri: str, dest_uri: str) -> None:
    """Server-side copy (multipart for large objects): no bytes travel through the pod."""
    src_bucket, src_key = parse_s3_uri(source_uri)
    bucket, key = parse_s3_uri(dest_uri)
    with _explained(dest_uri, bucket, client):
        client.copy({"Bucket": src_bucket, "Key": src_key}, bucket, key)


def list_keys(client: S3Client, uri: str) -> list[str]:
    """Keys under the folder ``uri``, relative to it (empty when there are none)."""
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    found: list[str] = []
    with _explained(uri, bucket, client):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
    return found


def delete_prefix(client: S3Client, uri: str) -> None:
    """Delete every object under the folder ``uri`` (1000 per request)."""
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    keys = [prefix + name for name in list_keys(client, uri)]
    with _explained(uri, bucket, client):
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def delete_object(client: S3Client, uri: str) -> None:
    bucket, key = parse_s3_uri(uri)
    with _explained(uri, bucket, client):
        client.delete_object(Bucket=bucket, Key=key)


def join_uri(folder_uri: str, name: str) -> str:
    """``join_uri("s3://b/a/", "x.json") == "s3://b/a/x.json"`` (one slash, whatever the input)."""
    return folder_uri.rstrip("/") + "/" + name.lstrip("/")


NO_ACCESS_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                             "AllAccessDisabled", "AccountProblem"})
"""S3 refused these credentials for this bucket: the same request fails the same way again."""
TRANSIENT_403_CODES = frozenset({"RequestTimeTooSkewed", "ExpiredToken", "TokenRefreshRequired"})
"""403s a restart can cure: a node's clock, short-lived credentials that are renewed."""


class _explained:
    """Context manager turning botocore failures into one-line, actionable TrainerErrors:
    AccessErrors (permanent) for refusals and missing buckets or keys, plain TrainerErrors
    (transient) for everything a retry may cure."""

    def __init__(self, uri: str, bucket: str, client: S3Client) -> None:
        self.uri, self.bucket, self.client = uri, bucket, client

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, _tb: object) -> bool:
        if exc is None or isinstance(exc, TrainerError):
            return False
        if isinstance(exc, Boto3Error) and isinstance(exc.__context__, (ClientError, BotoCoreError)):
            # boto3's transfers re-raise S3's answer as S3UploadFailedError / RetriesExceededError.
            exc = exc.__context__
        if isinstance(exc, NoCredentialsError):
            raise AccessError(f"{self.uri}: no S3 credentials: set storage.credentialsSecret on the FineTuneJob "
                              "(env AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        if isinstance(exc, EndpointConnectionError):
            raise TrainerError(f"{self.uri}: cannot reach the S3 endpoint ({exc.kwargs.get('endpoint_url')}): "
                               "check storage.endpoint and the network") from None
        if isinstance(exc, ClientError):
            raise self._client_error(exc) from None
        last = getattr(exc, "last_exception", None)
        if isinstance(exc, Boto3Error) and last is not None:  # boto3's download retries used up
            raise TrainerError(f"{self.uri}: the download kept breaking off, the last time with: {last}; "
                               "check storage.endpoint and the network") from None
        if isinstance(exc, (BotoCoreError, Boto3Error)):  # timeouts, dropped connections, retries used up
            raise TrainerError(f"{self.uri}: S3 client error: {exc}") from None
        return False

    def _client_error(self, exc: ClientError) -> TrainerError:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (status == 404 and not self._bucket_exists()):
            return AccessError(f"{self.uri}: bucket {self.bucket!r} does not exist: create it or fix the URI")
        if code in ("NoSuchKey", "404") or status == 404:
            return AccessError(f"{self.uri}: no such object in bucket {self.bucket!r}: check the key and that "
                               "the upload finished")
        if code in NO_ACCESS_CODES or (status == 403 and code not in TRANSIENT_403_CODES):
            return AccessError(f"{self.uri}: access denied to bucket {self.bucket!r} ({code}): check the "
                               "credentials in storage.credentialsSecret and the bucket policy")
        # 5xx, SlowDown and other throttling, RequestTimeout, a skewed clock: worth a restart.
        return TrainerError(f"{self.uri}: S3 error {code or status} on bucket {self.bucket!r}: {exc}")

    def _bucket_exists(self) -> bool:
        """A 404 from HeadObject does not say whether the bucket or the key is missing."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404
        except BotoCoreError:
            return True
        return True
