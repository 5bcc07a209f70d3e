"""The S3 store: objects in a bucket of any S3-compatible server (AWS S3, MinIO, Ceph RGW,
SeaweedFS), under an optional key prefix: ``s3://bucket/prefix``.

boto3 rather than fsspec/s3fs: the service's storage calls are synchronous (FastAPI's thread
pool, the workers' threads) and few, so an async file-system layer buys nothing; boto3 sends
the conditional create (``IfNoneMatch``) and hands back the status of its refusal as the
server sent it (s3fs turns a 412 without ``<Condition>``, as SeaweedFS sends it, into
``EINVAL``); its managed transfer uploads large files in parallel parts; and it reads the
standard AWS chain for credentials, region and retries (environment, shared config and
credentials files, instance or pod roles, ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE``). Nothing
here names AWS: the endpoint is ``LORAFLEET_S3_ENDPOINT_URL`` when set.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from shared.errors import StorageUnavailable
from shared.storage.base import ObjectMissing, Store, StoreWriter, join

# Parts of a streamed write and of a file upload. 8 MiB is boto3's own default chunk size; S3
# needs at least 5 MiB for every part but the last.
PART_BYTES = 8 * 1024 * 1024
# Parts sent at once per upload: bounds the memory of a streamed write to this many parts.
CONCURRENCY = 4
DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
# Error codes that mean "the server is there but cannot serve now".
UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                     "RequestTimeTooSkewed", "ServiceUnavailableException"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``.

    Raises:
        ValueError: not an ``s3://`` URL with a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    return parts.netloc, parts.path.strip("/")


def _status(error: Any) -> tuple[int, str]:
    response = getattr(error, "response", None) or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return status, str(response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """botocore's errors in the storage interface's terms: a missing key, or an unavailable
    store (no connection, timeouts, 5xx after the client's retries). Refusals that a retry
    cannot fix (403: wrong credentials, a missing bucket) pass through unchanged."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except ClientError as e:
        status, code = _status(e)
        if code in MISSING_CODES or (status == 404 and code != "NoSuchBucket"):
            raise ObjectMissing(what) from e
        if status >= 500 or code in UNAVAILABLE_CODES:
            raise StorageUnavailable(f"the object store failed ({what}): {e}") from e
        raise
    except (BotoConnectionError, HTTPClientError) as e:
        raise StorageUnavailable(f"the object store cannot be reached ({what}): {e}") from e
    except S3UploadFailedError as e:  # boto3's managed upload wraps the part's error
        cause = e.__context__
        status, code = _status(cause)
        if isinstance(cause, (BotoConnectionError, HTTPClientError)) or status >= 500 \
                or code in UNAVAILABLE_CODES:
            raise StorageUnavailable(f"the object store failed ({what}): {e}") from e
        raise


class _MultipartWriter(StoreWriter):
    """Sends each full part as soon as it is written (up to :data:`CONCURRENCY` at once, so
    memory stays at a few parts); an object smaller than one part is one PUT at commit."""

    def __init__(self, store: S3Store, key: str):
        self.store = store
        self.key = key
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.slots = threading.Semaphore(CONCURRENCY)
        self.pool: ThreadPoolExecutor | None = None
        self.done = False

    def write(self, data: bytes | bytearray) -> None:
        assert not self.done, "write after commit or abort"
        self.buffer += data
        while len(self.buffer) >= PART_BYTES:
            part = bytes(self.buffer[:PART_BYTES])
            del self.buffer[:PART_BYTES]
            self._send(part)

    def _send(self, data: bytes) -> None:
        client = self.store.client
        if self.upload_id is None:
            with _errors(self.key):
                self.upload_id = client.create_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key)["UploadId"]
            self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="s3-part")
        self._raise_failed()
        self.slots.acquire()
        number = len(self.parts) + 1
        assert self.pool is not None

        def send() -> dict[str, Any]:
            try:
                with _errors(self.key):
                    answer = client.upload_part(Bucket=self.store.bucket, Key=self.key,
                                                UploadId=self.upload_id, PartNumber=number,
                                                Body=data)
                return {"ETag": answer["ETag"], "PartNumber": number}
            finally:
                self.slots.release()

        self.parts.append(self.pool.submit(send))

    def _raise_failed(self) -> None:
        for part in self.parts:
            if part.done() and part.exception() is not None:
                part.result()

    def commit(self) -> None:
        assert not self.done, "commit after commit or abort"
        client = self.store.client
        if self.upload_id is None:
            with _errors(self.key):
                client.put_object(Bucket=self.store.bucket, Key=self.key,
                                  Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send(bytes(self.buffer))
            parts = [p.result() for p in self.parts]
            with _errors(self.key):
                client.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts})
        self.buffer.clear()
        self.done = True
        self._close_pool()

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.buffer.clear()
        self._close_pool()
        if self.upload_id is not None:
            # Best effort: a store that is away keeps the parts until abort_uploads (the next
            # attempt's cleanup, or the bucket's lifecycle rule) drops them.
            with contextlib.suppress(Exception):
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``.

    Args:
        endpoint_url: an S3-compatible server (``http://minio:9000``); None: AWS S3.
        path_style: address buckets as ``host/bucket/key`` (most self-hosted servers) rather
            than ``bucket.host/key``.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 path_style: bool = False):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.path_style = path_style
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.url('')!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The boto3 client (thread-safe), made anew in a forked child: a parent's open
        connections must not be shared."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    import boto3
                    from botocore.config import Config

                    config = Config(
                        s3={"addressing_style": "path" if self.path_style else "auto"},
                        # Short: an unreachable store answers 503 in seconds, not minutes.
                        connect_timeout=5, read_timeout=60,
                        max_pool_connections=4 * CONCURRENCY,
                        # Checksums only where S3 requires them (DeleteObjects): lorafleet
                        # checks every object itself (a file row's and a manifest's sha256),
                        # and the CRC32 trailers boto3 sends by default since 1.36 are refused
                        # or mishandled by several S3-compatible stores.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
                    self._client = boto3.session.Session().client(
                        "s3", endpoint_url=self.endpoint_url, config=config)
                    self._pid = os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def key_of(self, url: str) -> str:
        bucket, path = parse_url(url)
        base = f"{self.prefix}/" if self.prefix else ""
        if bucket != self.bucket or not path.startswith(base) or path == base.rstrip("/"):
            raise ValueError(f"{url} is outside the storage {self.url('')}")
        return path[len(base):]

    def check(self) -> None:
        with _errors("the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        for attempt in range(5):
            try:
                with _errors(key):
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                           IfNoneMatch="*")
                return True
            except ClientError as e:
                status, _code = _status(e)
                if status == 412:
                    return False
                if status != 409 or attempt == 4:
                    raise
                # 409 ConditionalRequestConflict: another conditional write of the key was in
                # flight; S3 asks to try again.
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def get_bytes(self, key: str) -> bytes:
        with _errors(key):
            return cast(bytes, self.client.get_object(Bucket=self.bucket,
                                                      Key=self._key(key))["Body"].read())

    def exists(self, key: str) -> bool:
        try:
            with _errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectMissing:
            return False
        return True

    def open_read(self, key: str) -> BinaryIO:
        with _errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return cast(BinaryIO, _Guarded(body, key))

    def writer(self, key: str) -> StoreWriter:
        return _MultipartWriter(self, self._key(key))

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                              max_concurrency=CONCURRENCY)

    def upload_file(self, path: Path, key: str) -> None:
        with _errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    Config=self._transfer())

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.download")
        try:
            with _errors(key):
                self.client.download_file(self.bucket, self._key(key), str(tmp),
                                          Config=self._transfer())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) + ("/" if prefix.endswith("/") else "")
        base = len(self.prefix) + 1 if self.prefix else 0
        with _errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            return sorted(o["Key"][base:] for page in pages for o in page.get("Contents", []))

    def delete(self, keys: Iterable[str]) -> None:
        batch = [self._key(k) for k in keys]
        for start in range(0, len(batch), DELETE_BATCH):
            chunk = batch[start:start + DELETE_BATCH]
            with _errors("delete"):
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in chunk], "Quiet": True})
            failed = [e for e in answer.get("Errors", []) if e.get("Code") not in MISSING_CODES]
            if failed:
                raise StorageUnavailable(f"the object store did not delete {len(failed)} "
                                         f"objects: {failed[0]}")

    def abort_uploads(self, prefix: str) -> int:
        full = self._key(prefix) + ("/" if prefix.endswith("/") else "")
        aborted = 0
        with _errors(prefix):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for upload in page.get("Uploads", []):
                    with contextlib.suppress(ObjectMissing):  # finished or aborted meanwhile
                        with _errors(upload["Key"]):
                            self.client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload["Key"],
                                UploadId=upload["UploadId"])
                        aborted += 1
        return aborted


class _Guarded:
    """A response body whose read errors are the storage interface's."""

    def __init__(self, body: Any, key: str):
        self.body = body
        self.key = key

    def read(self, size: int = -1) -> bytes:
        with _errors(self.key):
            return cast(bytes, self.body.read(None if size < 0 else size))

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
