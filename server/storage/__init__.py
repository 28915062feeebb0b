"""Where generated images and client uploads are kept, chosen by one setting.

    storage = open_storage(settings)   # the only place that chooses
    name = storage.save(data, "png")   # then the same calls whatever the store

- No `--storage-url` (the default): `LocalStorage`, a folder (`--files-dir`), served by this
  server's files route (server/storage/local.py).
- `--storage-url s3://bucket/prefix`: `S3Storage`, an S3-compatible bucket, read by clients
  straight from the bucket (server/storage/s3.py; botocore is imported only then).

The interface, the names and the URLs they share are in server/storage/base.py.
"""

from __future__ import annotations

from server.config import Settings
from server.storage.base import (
    DEFAULT_CONTENT_TYPE,
    FILES_PATH,
    MAX_PARTS,
    UPLOAD_WINDOW_SECONDS,
    Reservation,
    Storage,
    StorageUnavailable,
    StoredFile,
    file_name_from_url,
    file_url,
    image_url,
    multipart_url,
    normalize_content_type,
    plain_file_url,
    upload_extension,
    upload_url,
)
from server.storage.local import LocalStorage

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "FILES_PATH",
    "MAX_PARTS",
    "UPLOAD_WINDOW_SECONDS",
    "LocalStorage",
    "Reservation",
    "Storage",
    "StorageUnavailable",
    "StoredFile",
    "file_name_from_url",
    "file_url",
    "image_url",
    "multipart_url",
    "normalize_content_type",
    "open_storage",
    "plain_file_url",
    "upload_extension",
    "upload_url",
]


def open_storage(settings: Settings) -> Storage:
    """The store the settings name. Makes no network call: a bucket that cannot be used is
    found by the start-up check (`bucket_problem`), or by the first request that needs it."""
    if not settings.storage_url:
        return LocalStorage(settings.files_dir)
    from server.storage.s3 import S3Storage
    from server.storage.s3_client import BucketLocation, make_client

    return S3Storage(
        make_client(),
        BucketLocation.parse(settings.storage_url),
        spool_dir=settings.upload_spool_dir,
        retention_seconds=settings.retention_seconds,
        public_url=settings.storage_public_url,
    )
