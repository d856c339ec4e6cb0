"""Object store over the S3 API (aioboto3), and a local-folder twin with the same interface.

Keys are ``/``-separated paths (``raw/grass/<sha256>.jpg``). ``OBJECT_STORE_URL=s3://bucket/prefix``
selects S3 (Minio, moto or AWS through ``S3_ENDPOINT_URL``); anything else is a local folder.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

from shared.settings import ObjectStoreSettings


class ObjectStoreError(RuntimeError):
    """The object store could not be reached or refused an operation."""


class ObjectStore(Protocol):
    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def exists(self, key: str) -> bool: ...
    async def list(self, prefix: str = "") -> list[str]: ...
    async def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...


class LocalStore:
    """Objects as files below ``root``; writes are atomic (temporary file, then rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ObjectStoreError(f"key {key!r} leaves the store")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise ObjectStoreError(f"no object {key!r} in {self.root}") from None

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def list(self, prefix: str = "") -> list[str]:
        def walk() -> list[str]:
            if not self.root.exists():
                return []
            keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
            return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".tmp-"))

        return await asyncio.to_thread(walk)

    async def delete(self, key: str) -> None:
        """Remove ``key``; a key that is already gone is not an error."""
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


class S3Store:
    """Objects in ``bucket`` under ``prefix`` through one shared aioboto3 client."""

    def __init__(self, client: object, bucket: str, prefix: str = "") -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await self._call("put_object", Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    async def get(self, key: str) -> bytes:
        response = await self._call("get_object", Bucket=self.bucket, Key=self._key(key))
        async with response["Body"] as body:
            return await body.read()

    async def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            await self._client.head_object(Bucket=self.bucket, Key=self._key(key))  # type: ignore[attr-defined]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"S3 head_object failed: {exc}") from exc
        except Exception as exc:  # connection errors from botocore/aiohttp
            raise ObjectStoreError(f"S3 is unreachable: {exc}") from exc
        return True

    async def list(self, prefix: str = "") -> list[str]:
        paginator = self._client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except Exception as exc:
            raise ObjectStoreError(f"S3 list failed: {exc}") from exc
        return sorted(keys)

    async def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            await self._client.head_bucket(Bucket=self.bucket)  # type: ignore[attr-defined]
        except ClientError:
            await self._call("create_bucket", Bucket=self.bucket)
        except Exception as exc:
            raise ObjectStoreError(f"S3 is unreachable: {exc}") from exc

    async def delete(self, key: str) -> None:
        """Remove ``key``; a key that is already gone is not an error (S3 semantics)."""
        await self._call("delete_object", Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    async def _call(self, operation: str, **kwargs: object) -> dict:
        try:
            return await getattr(self._client, operation)(**kwargs)
        except Exception as exc:
            raise ObjectStoreError(f"S3 {operation} failed: {exc}") from exc


def parse_s3_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"OBJECT_STORE_URL {url!r} names no bucket")
    return bucket, prefix


@asynccontextmanager
async def open_store(settings: ObjectStoreSettings, *, create_bucket: bool = True) -> AsyncIterator[ObjectStore]:
    """The store ``settings`` describe, open for the duration of the ``async with`` block."""
    if not settings.is_s3:
        yield LocalStore(settings.url)
        return
    import aioboto3
    from botocore.config import Config

    bucket, prefix = parse_s3_url(settings.url)
    session = aioboto3.Session(
        aws_access_key_id=settings.access_key_id.get_secret_value() if settings.access_key_id else None,
        aws_secret_access_key=settings.secret_access_key.get_secret_value() if settings.secret_access_key else None,
        region_name=settings.region,
    )
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=32,
        s3={"addressing_style": "path"},
    )
    async with session.client("s3", endpoint_url=settings.endpoint_url, config=config) as client:
        store = S3Store(client, bucket, prefix)
        if create_bucket:
            await store.ensure_bucket()
        yield store
