"""The connection to an S3-compatible bucket: where it is, how to sign, what its errors mean.

The client is botocore's (the core of boto3, pure Python, no torch): it reads the endpoint,
region and credentials exactly as every AWS SDK does, which is what a platform team expects
to configure, from the first of:

- `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, Ceph RGW, SeaweedFS, a cloud's S3 API),
  else AWS itself; `AWS_REGION` / `AWS_DEFAULT_REGION`;
- `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), a profile of
  `~/.aws/credentials` and `~/.aws/config` (`AWS_PROFILE`), web identity (EKS IRSA),
  container credentials (ECS, EKS Pod Identity), SSO, `credential_process`, or the instance
  metadata service.

Addressing: an endpoint other than AWS's gets path-style URLs (`http://host:port/bucket/key`,
which every S3-compatible server answers, where bucket subdomains need DNS records); a
profile's `s3 = addressing_style = ...` overrides that.

Errors become OSErrors the callers already handle: `StorageUnavailable` when trying again
later may work (connection refused, timeouts, 5xx, throttling), `FileNotFoundError` for a
missing key, `PermissionError` for refused credentials, a plain `OSError` otherwise.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from server.storage.base import StorageUnavailable

# Retried by the client itself before an error reaches us (botocore's "standard" mode backs off).
CLIENT_ATTEMPTS = 3
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
# Threads of one process that may talk to the bucket at once (uploads, reads, deletes).
MAX_CONNECTIONS = 32
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "ServiceUnavailable",
    "InternalError",
}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_REFUSED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
}


@dataclass(frozen=True)
class BucketLocation:
    bucket: str
    prefix: str  # "" or ending in "/"

    @classmethod
    def parse(cls, url: str) -> BucketLocation:
        """`s3://bucket` or `s3://bucket/some/prefix`; ValueError naming what is wrong."""
        parts = urlsplit(url.strip())
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"{url!r}: give only s3://bucket/prefix (credentials come from AWS_* settings)")
        bucket = parts.netloc
        if not 3 <= len(bucket) <= 63:
            raise ValueError(f"{url!r}: a bucket name has 3 to 63 characters")
        prefix = parts.path.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def make_client(*, max_connections: int = MAX_CONNECTIONS) -> Any:
    """A thread-safe botocore S3 client configured from the environment (see above).
    Imported here, not at module level: a server on local files never loads botocore."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.Session()
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": CLIENT_ATTEMPTS, "mode": "standard"},
        max_pool_connections=max_connections,
        # Checksums only where S3 requires them: several S3-compatible servers refuse the
        # newer default trailers on uploads.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        signature_version="s3v4",
    )
    client = session.create_client("s3", config=config)
    style = (session.get_scoped_config().get("s3") or {}).get("addressing_style")
    if style is None and not _is_aws(client.meta.endpoint_url):
        client = session.create_client("s3", config=config.merge(Config(s3={"addressing_style": "path"})))
    return client


def _is_aws(endpoint_url: str) -> bool:
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def error_code(exc: BaseException) -> tuple[str, int]:
    """A botocore ClientError's code and HTTP status; ("", 0) for other exceptions."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def translate(exc: Exception, doing: str) -> OSError:
    """The OSError that says what `exc`, raised while `doing` something, means for a caller."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as EndpointUnreachable

    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        if code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket"):
            return FileNotFoundError(errno.ENOENT, f"object storage: {doing}: not found ({code or status})")
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageUnavailable(errno.EIO, f"object storage unavailable ({doing}: {code or status})")
        if code in _REFUSED_CODES or status == 403:
            return PermissionError(errno.EACCES, f"object storage refused {doing}: {code or status}")
        return OSError(errno.EIO, f"object storage: {doing}: {code or status}")
    if isinstance(exc, (EndpointUnreachable, HTTPClientError)):  # refused, reset, timed out
        return StorageUnavailable(errno.EIO, f"object storage unreachable ({doing}: {type(exc).__name__})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(errno.EACCES, f"object storage: {exc}")
    return OSError(errno.EIO, f"object storage: {doing}: {type(exc).__name__}: {exc}")


def bucket_problem(client: Any, location: BucketLocation) -> str | None:
    """Why this server cannot use the bucket (one line), or None: the bucket answers, the
    credentials are accepted, and an object can be written and deleted under the prefix."""
    import secrets

    from botocore.exceptions import BotoCoreError, ClientError

    where = f"{location} at {client.meta.endpoint_url}"
    probe = f"{location.prefix}.probe/{secrets.token_hex(8)}"
    step = "reading the bucket"
    try:
        client.head_bucket(Bucket=location.bucket)
        step = "writing a test object"
        client.put_object(Bucket=location.bucket, Key=probe, Body=b"flux-server start-up check")
        step = "deleting the test object"
        client.delete_object(Bucket=location.bucket, Key=probe)
    except ClientError as exc:
        code, status = error_code(exc)
        if code == "NoSuchBucket" or (step == "reading the bucket" and status == 404):
            return f"object storage {where}: the bucket does not exist"
        if code in _REFUSED_CODES or status == 403:
            return (
                f"object storage {where}: access denied while {step} ({code or status}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile or role) and the bucket's policy"
            )
        return f"object storage {where}: {step} failed: {code or status}"
    except BotoCoreError as exc:
        return f"object storage {where}: {step} failed: {exc}"
    return None
