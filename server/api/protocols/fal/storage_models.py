"""fal's storage (upload) wire models, as the real clients send and read them.

Python `fal_client`: a token (`POST /storage/auth/token`), then the bytes in one request
(`POST /files/upload`) or, above 100 MB, a multipart upload (`POST /files/upload/multipart`,
`PUT .../multipart/{uploadId}/{n}`, `POST .../complete`); its fallback, and the JS client,
initiate an upload (`POST /storage/upload/initiate[-multipart]`) and PUT the bytes to the
returned `upload_url`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StorageToken(BaseModel):
    """`expires_at` carries an offset: fal_client compares it with an aware UTC time."""

    token: str
    token_type: str
    base_url: str
    expires_at: str


class InitiateUploadInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    file_name: str | None = Field(default=None, max_length=1024)
    content_type: str | None = Field(default=None, max_length=255)


class InitiateUploadOutput(BaseModel):
    upload_url: str  # where the bytes go (PUT), authorised by its unguessable upload id
    file_url: str  # the finished file's URL, the value to send as image_url / mask_url


class UploadOutput(BaseModel):
    access_url: str


class MultipartStarted(BaseModel):
    access_url: str
    uploadId: str  # fal's spelling


class UploadedPart(BaseModel):
    """One received part; the same value is in the answer's ETag header (fal_client reads
    the header, the JS client the body)."""

    partNumber: int
    etag: str


class CompleteMultipartInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    parts: list[UploadedPart] = Field(min_length=1, max_length=10_000)
