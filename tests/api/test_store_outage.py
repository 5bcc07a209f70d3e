"""The API while the object store is away: what needs it answers 503 ``storage_unavailable``
with ``Retry-After`` and keeps nothing (an upload leaves no object and no row); deletions are
decided in the database and their objects deleted once the store is back; a job whose files
cannot be checked yet waits in ``validating_files`` without holding up the sweeper.

The API runs in this process on an S3 bucket of a SeaweedFS of this module's own, which the
tests stop and start (never the session's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.auth import create_key
from shared import deletions, storage
from shared.db import session_scope
from shared.models import Job, StorageDeletion
from tests.api.test_model_management import add_checkpoint, add_source
from tests.security.expect import error_of
from tests.support import dialogsum_records, jsonl_bytes
from tests.support.seaweedfs import SeaweedFS
from tests.support.stored import folder_gone

HUB_MODEL = "some-org/some-model"  # a valid hub id: job creation never loads it
PART = 8 * 1024 * 1024  # an upload past one part is sent as a multipart upload


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with SeaweedFS(tmp_path_factory.mktemp("store")) as server:
        yield server


@pytest.fixture
def store(store_server: SeaweedFS) -> Iterator[SeaweedFS]:
    """The store, up at the start and at the end of each test."""
    store_server.start()
    yield store_server
    store_server.start()


class Api:
    """The API in this process on a fresh bucket of the store, with a key of project ``p``
    and an uploaded file."""

    def __init__(self, started_app: Callable[..., TestClient], store: SeaweedFS,
                 **settings: Any):
        self.store = store
        self.bucket = store.new_bucket()
        env = store.env(self.bucket, "lf")
        self.client = started_app(storage_url=env["LORAFLEET_STORAGE_URL"],
                                  s3_endpoint_url=env["LORAFLEET_S3_ENDPOINT_URL"],
                                  s3_path_style="true", **settings)
        with session_scope() as s:
            self.headers = {"Authorization": f"Bearer {create_key(s, 'p')[1]}"}
        self.file_id = self.upload(jsonl_bytes(dialogsum_records(4))).json()["id"]

    def upload(self, content: bytes) -> httpx.Response:
        return self.client.post("/v1/files", headers=self.headers, data={"purpose": "fine-tune"},
                                files={"file": ("data.jsonl", content)})

    def create_job(self, file_id: str) -> httpx.Response:
        return self.client.post("/v1/fine_tuning/jobs", headers=self.headers, json={
            "model": HUB_MODEL, "training_file": file_id, "max_steps": 2})

    def keys(self, prefix: str) -> list[str]:
        return [k.removeprefix("lf/") for k in self.store.keys(self.bucket, f"lf/{prefix}")]

    def unfinished_uploads(self) -> list[Any]:
        answer = self.store.client().list_multipart_uploads(Bucket=self.bucket)
        return list(answer.get("Uploads") or [])


@pytest.fixture
def api(started_app: Callable[..., TestClient], store: SeaweedFS) -> Callable[..., Api]:
    return lambda **settings: Api(started_app, store, **settings)


def assert_store_unavailable(answer: httpx.Response) -> None:
    error = error_of(answer, 503)
    assert (error["type"], error["code"]) == ("server_error", "storage_unavailable")
    assert answer.headers["Retry-After"].isdigit()


def outbox() -> list[str]:
    with session_scope() as s:
        return list(s.scalars(select(StorageDeletion.key).order_by(StorageDeletion.seq)))


def test_an_upload_refused_while_the_store_is_away_leaves_no_object_and_no_row(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    a = api()
    line = jsonl_bytes(dialogsum_records(1))
    large = line * (PART // len(line) + 2)  # two parts: a multipart upload

    store.stop()
    small_answer, large_answer = a.upload(line), a.upload(large)
    health = a.client.get("/health")
    store.start()
    listed = a.client.get("/v1/files", headers=a.headers).json()["data"]

    assert_store_unavailable(small_answer)
    assert_store_unavailable(large_answer)
    assert health.status_code == 503 and health.json()["storage"].startswith("error")
    assert health.json()["database"] == health.json()["broker"] == "ok"
    assert [f["id"] for f in listed] == [a.file_id]
    assert a.keys("files/") == [f"files/{a.file_id}.jsonl"]
    assert a.unfinished_uploads() == []


def test_reads_that_need_the_store_answer_503_and_the_rest_answer(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    a = api()
    job_id = a.create_job(a.file_id).json()["id"]
    meta = f"/v1/files/{a.file_id}"
    reads = [meta, "/v1/files", "/v1/models", "/v1/fine_tuning/jobs",
             f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events",
             f"/v1/fine_tuning/jobs/{job_id}/checkpoints"]

    store.stop()
    content = a.client.get(f"{meta}/content", headers=a.headers)
    answers = {path: a.client.get(path, headers=a.headers).status_code for path in reads}
    console = a.client.get("/console")
    store.start()
    back = a.client.get(f"{meta}/content", headers=a.headers)

    assert_store_unavailable(content)
    assert answers == dict.fromkeys(reads, 200)
    assert console.status_code == 200
    assert back.status_code == 200 and back.content == jsonl_bytes(dialogsum_records(4))


def test_a_model_deleted_while_the_store_is_away_is_gone_and_its_objects_follow(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    """The deletion is decided in the database and answered 200; its objects wait in the
    outbox until a purge finds the store back. A checkpoint's model, which the API must find
    in the store before it deletes it, is refused 503 and stays whole."""
    a = api()
    source = add_source()
    model, folder = str(source.fine_tuned_model), str(source.adapter_dir)
    checkpoint = add_checkpoint(source, 2)
    checkpoint_folder = storage.checkpoint_key(source.id, 1, 2)

    store.stop()
    deleted = a.client.delete(f"/v1/models/{model}", headers=a.headers)
    refused = a.client.delete(f"/v1/models/{checkpoint}", headers=a.headers)
    listed = [m["id"] for m in a.client.get("/v1/models", headers=a.headers).json()["data"]]
    again = a.client.delete(f"/v1/models/{model}", headers=a.headers)
    purged_while_away = deletions.purge_pending()
    waiting = outbox()
    store.start()
    kept = not folder_gone(folder)
    purged = deletions.purge_pending()

    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    assert_store_unavailable(refused)
    assert model not in listed and checkpoint in listed
    assert error_of(again, 404)["code"] == "model_not_found"
    assert (purged_while_away, waiting, kept) == (0, [folder], True)
    assert purged == 1 and outbox() == []
    assert folder_gone(folder)
    assert not folder_gone(checkpoint_folder)


def test_a_file_deleted_while_the_store_is_away_is_gone_and_its_content_follows(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    a = api()
    key = f"files/{a.file_id}.jsonl"

    store.stop()
    deleted = a.client.delete(f"/v1/files/{a.file_id}", headers=a.headers)
    gone = a.client.get(f"/v1/files/{a.file_id}", headers=a.headers)
    store.start()
    kept = a.keys("files/")
    purged = deletions.purge_pending()

    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    assert error_of(gone, 404)["param"] == "file_id"
    assert kept == [key]
    assert purged == 2  # the content, and the data sets tokenized from it (none yet)
    assert a.keys("files/") == [] and outbox() == []


def test_a_job_continuing_from_a_model_is_refused_while_the_store_is_away_and_not_kept(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    """A job that continues from a fine-tuned model reads the adapter's shape from the store
    before it is stored."""
    a = api()
    source = add_source()
    model = str(source.fine_tuned_model)

    store.stop()
    refused = a.client.post("/v1/fine_tuning/jobs", headers=a.headers, json={
        "model": model, "training_file": a.file_id, "max_steps": 2})
    store.start()
    listed = a.client.get("/v1/fine_tuning/jobs", headers=a.headers).json()["data"]
    accepted = a.client.post("/v1/fine_tuning/jobs", headers=a.headers, json={
        "model": model, "training_file": a.file_id, "max_steps": 2})

    assert_store_unavailable(refused)
    assert [j["id"] for j in listed] == [source.id]  # the source job only
    assert accepted.status_code == 200, accepted.text


def test_a_deletion_purges_at_once_when_the_store_answers(api: Callable[..., Api]) -> None:
    a = api()
    source = add_source()

    deleted = a.client.delete(f"/v1/models/{source.fine_tuned_model}", headers=a.headers)

    assert deleted.status_code == 200
    assert folder_gone(str(source.adapter_dir)) and outbox() == []


def test_a_job_whose_files_the_store_cannot_give_yet_waits_without_holding_up_the_sweeper(
        api: Callable[..., Api], store: SeaweedFS) -> None:
    """Created while the store is away, with a file this node never fetched: stored and
    answered 200, left in ``validating_files``; the sweeper passes over it (and still sends
    other jobs), and checks it once the store is back."""
    from worker.sweeper import sweep

    a = api(requeue_after_seconds=0.001)
    fresh = a.upload(jsonl_bytes(dialogsum_records(3, offset=10))).json()["id"]
    other = a.create_job(a.file_id).json()["id"]  # checked now: queued and sent
    with session_scope() as s:  # its wake-up call was lost: the sweeper must send it again
        s.execute(Job.__table__.update().where(Job.id == other).values(enqueued_at=None))

    store.stop()
    created = a.create_job(fresh)
    swept_while_away = sweep()
    waiting = _status(created.json()["id"])
    store.start()
    swept = sweep()

    assert created.status_code == 200, created.text
    assert created.json()["status"] == "validating_files"
    assert swept_while_away == [other]
    assert waiting == "validating_files"
    assert created.json()["id"] in swept  # checked, queued and sent
    assert _status(created.json()["id"]) == "queued"


def _status(job_id: str) -> str:
    with session_scope() as s:
        return str(s.scalar(select(Job.status).where(Job.id == job_id)))
