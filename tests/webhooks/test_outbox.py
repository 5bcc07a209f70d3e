"""The outbox in one process: what is recorded (and only with its transaction), the backoff,
the signatures OpenAI's SDK verifies, sends to a real local receiver, and exclusive claims."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from sqlalchemy import select

from shared import lifecycle, outbox
from shared.db import session_scope
from shared.models import Job, WebhookDelivery, WebhookEndpoint
from tests.webhooks.receiver import Receiver

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="
SETTINGS = {"webhook_backoff_seconds": 0.2, "webhook_max_backoff_seconds": 1,
            "webhook_max_attempts": 3, "webhook_timeout_seconds": 5,
            "webhook_allow_private_targets": "true"}


@pytest.fixture
def db(settings_env: Callable[..., Any]) -> Any:
    from shared.migrate import upgrade

    settings = settings_env(**SETTINGS)
    upgrade()
    return settings


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first={"/flaky": 1}).start()
    yield server
    server.stop()


def add_job(project: str = "p", job_id: str = "ftjob-1", status: str = "queued") -> str:
    with session_scope() as s:
        s.add(Job(id=job_id, project=project, created_at=1, model="m", status=status,
                  training_file="file-1", spec={}, seed=1))
    return job_id


def add_endpoint(url: str = "http://127.0.0.1:9/hook", project: str = "p",
                 events: tuple[str, ...] = outbox.EVENT_TYPES, secret: str = SECRET) -> str:
    endpoint_id = f"whep_{len(url)}{time.monotonic_ns()}"
    with session_scope() as s:
        s.add(WebhookEndpoint(id=endpoint_id, project=project, url=url,
                              event_types=list(events), secret=secret, created_at=1,
                              updated_at=1))
    return endpoint_id


def deliveries() -> list[WebhookDelivery]:
    with session_scope() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.seq)))


def unwrap(body: bytes | str, headers: dict[str, str], secret: str = SECRET) -> Any:
    return openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)


# --------------------------------------------------------------------------- recording
def test_an_event_goes_to_each_subscribed_endpoint_of_the_jobs_project(db: Any) -> None:
    job_id = add_job()
    every = add_endpoint()
    checkpoints = add_endpoint(events=("fine_tuning.job.checkpoint.created",))
    add_endpoint(events=("fine_tuning.job.failed",))
    add_endpoint(project="other")
    with session_scope() as s:
        outbox.record(s, job_id, "fine_tuning.job.checkpoint.created",
                      {"checkpoint_id": "ftckpt-1-4", "step_number": 4})

    rows = deliveries()
    assert [r.endpoint_id for r in rows] == [every, checkpoints]
    assert rows[0].event_id == rows[1].event_id and rows[0].event_id.startswith("evt_")
    assert rows[0].payload == {
        "id": rows[0].event_id, "object": "event", "created_at": rows[0].created_at,
        "type": "fine_tuning.job.checkpoint.created",
        "data": {"id": job_id, "checkpoint_id": "ftckpt-1-4", "step_number": 4}}
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}


def test_a_project_without_endpoints_records_nothing(db: Any) -> None:
    add_endpoint(project="other")
    with session_scope() as s:
        outbox.record(s, add_job(), "fine_tuning.job.succeeded")
        outbox.record(s, "ftjob-missing", "fine_tuning.job.succeeded")
    assert deliveries() == []


def test_an_event_exists_if_and_only_if_its_transition_is_committed(db: Any) -> None:
    add_endpoint()
    job_id = add_job()
    with pytest.raises(RuntimeError), session_scope() as s:
        assert lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))
        raise RuntimeError("the request fails after the cancel")
    assert deliveries() == []

    with session_scope() as s:
        assert lifecycle.pause(s, s.scalar(select(Job).where(Job.id == job_id)))
    with session_scope() as s:
        assert lifecycle.cancel(s, s.scalar(select(Job).where(Job.id == job_id)))
    assert [r.type for r in deliveries()] == ["fine_tuning.job.paused",
                                              "fine_tuning.job.cancelled"]


def test_a_failed_file_check_sends_failed(db: Any) -> None:
    add_endpoint()
    job_id = add_job(status="validating_files")
    with session_scope() as s:
        lifecycle.files_invalid(s, job_id, {"code": "invalid_file", "param": "training_file",
                                            "message": "line 3 is not JSON"})
    assert [(r.type, r.payload["data"]) for r in deliveries()] == [
        ("fine_tuning.job.failed", {"id": job_id})]


# --------------------------------------------------------------------------- backoff, signing
def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    assert [outbox.backoff_seconds(n, 0.2, 1.0) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.0,
                                                                         1.0]
    assert outbox.backoff_seconds(10_000, 10, 3600) == 3600


def test_signatures_verify_with_the_openai_sdk_and_standardwebhooks() -> None:
    from standardwebhooks import Webhook

    payload = outbox.event_payload("evt_1", "fine_tuning.job.succeeded", "ftjob-1")
    body = json.dumps(payload)
    headers = outbox.signed_headers([SECRET], "evt_1", int(time.time()), body)

    event = unwrap(body, headers)
    assert (event.id, event.type, event.data.id) == ("evt_1", "fine_tuning.job.succeeded",
                                                     "ftjob-1")
    assert Webhook(SECRET).verify(body, headers) == payload
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(body.replace("ftjob-1", "ftjob-2"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(body, headers, secret="whsec_" + "b3RoZXItc2VjcmV0LW90aGVyLXNlY3JldA==")


def test_while_a_rotation_keeps_the_old_secret_both_signatures_are_sent() -> None:
    new = "whsec_" + "bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldy1zZWNyZXQ="
    endpoint = WebhookEndpoint(secret=new, previous_secret=SECRET, previous_secret_until=200)
    assert outbox.signing_secrets(endpoint, 100) == [new, SECRET]
    assert outbox.signing_secrets(endpoint, 200) == [new]
    body = "{}"
    headers = outbox.signed_headers([new, SECRET], "evt_2", int(time.time()), body)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (new, SECRET):
        openai.OpenAI(api_key="unused").webhooks.verify_signature(body, headers, secret=secret)


# --------------------------------------------------------------------------- sending
def test_send_posts_the_signed_event_to_a_real_receiver(receiver: Receiver) -> None:
    payload = outbox.event_payload("evt_3", "fine_tuning.job.succeeded", "ftjob-3")
    first = outbox.send(receiver.url("/flaky"), payload, [SECRET], timeout=5,
                        allow_private=True)
    second = outbox.send(receiver.url("/flaky"), payload, [SECRET], timeout=5,
                         allow_private=True)
    assert (first.ok, first.status_code, first.error, first.permanent) == (
        False, 503, "HTTP 503: no", False)
    assert (second.ok, second.status_code) == (True, 200)
    got = receiver.requests("/flaky")
    assert [r.webhook_id for r in got] == ["evt_3", "evt_3"]
    for r in got:
        assert unwrap(r.body, r.headers).data.id == "ftjob-3"
        assert r.headers["content-type"] == "application/json"


def test_private_targets_are_refused_at_send_time_for_good(receiver: Receiver) -> None:
    result = outbox.send(receiver.url(), {"id": "evt_4"}, [SECRET], timeout=5,
                         allow_private=False)
    assert (result.status_code, result.permanent) == (None, True)
    assert "loopback" in (result.error or "")
    assert receiver.received == []


def test_the_send_connects_to_the_address_it_checked(receiver: Receiver,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once, checked, and that address is used, with the name kept in
    the Host header: a second DNS answer (rebinding) never gets a say."""
    real, lookups = socket.getaddrinfo, []

    def dns(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "hooks.example.test":  # the address literal the client connects to
            return real(host, *args, **kwargs)
        lookups.append(host)
        if len(lookups) > 1:
            raise AssertionError("the name was resolved again after the check")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    url = f"http://hooks.example.test:{receiver.port}/hook"
    result = outbox.send(url, {"id": "evt_5"}, [SECRET], timeout=5, allow_private=True)
    assert result.ok, result.error
    assert receiver.received[0].headers["host"] == f"hooks.example.test:{receiver.port}"


def test_no_listener_is_a_retryable_error() -> None:
    from tests.support.processes import free_port

    result = outbox.send(f"http://127.0.0.1:{free_port()}/", {"id": "evt_6"}, [SECRET],
                         timeout=5, allow_private=True)
    assert (result.status_code, result.permanent) == (None, False)
    assert "cannot connect" in (result.error or "")


# --------------------------------------------------------------------------- claims, retries
def test_a_failed_send_is_retried_after_the_backoff_then_marked_failed(db: Any) -> None:
    add_endpoint()
    with session_scope() as s:
        outbox.record(s, add_job(), "fine_tuning.job.succeeded")
    down = outbox.SendResult(503, "HTTP 503: busy")
    for attempt in (1, 2):
        claimed = outbox.claim_next(at=time.time() + 60)
        assert claimed is not None and claimed.attempts == attempt
        before = time.time()
        assert outbox.settle(claimed, down) == "pending"
        row = deliveries()[0]
        assert before + 0.2 * 2 ** (attempt - 1) <= row.next_attempt_at <= time.time() + 1
        assert (row.last_status_code, row.last_error) == (503, "HTTP 503: busy")
    claimed = outbox.claim_next(at=time.time() + 60)
    assert claimed is not None and claimed.attempts == 3
    assert outbox.settle(claimed, down) == "failed"
    assert outbox.claim_next(at=time.time() + 3600) is None
    assert (deliveries()[0].status, deliveries()[0].attempts) == ("failed", 3)


def test_a_claim_holds_the_row_until_its_lease_ends_and_fences_the_late_writer(db: Any) -> None:
    add_endpoint()
    with session_scope() as s:
        outbox.record(s, add_job(), "fine_tuning.job.succeeded")
    t = time.time()
    first = outbox.claim_next(at=t)
    assert first is not None and outbox.claim_next(at=t + 1) is None
    lease = 3 * 5 + 5
    second = outbox.claim_next(at=t + lease + 1)  # the first sender vanished
    assert second is not None and second.seq == first.seq and second.attempts == 2
    assert outbox.settle(first, outbox.SendResult(200)) == "delivered"  # computed, not written
    assert deliveries()[0].status == "pending"
    assert outbox.settle(second, outbox.SendResult(200)) == "delivered"
    assert (deliveries()[0].status, deliveries()[0].attempts) == ("delivered", 2)


@pytest.fixture
def postgres_db(settings_env: Callable[..., Any]) -> Iterator[Any]:
    """``db`` on a fresh PostgreSQL database (claims use ``FOR UPDATE SKIP LOCKED`` there)."""
    import uuid

    from sqlalchemy import create_engine, text

    from shared import db as shared_db
    from shared.migrate import upgrade
    from tests.support.backends import require_postgres

    admin = require_postgres()
    name = f"lorafleet_outbox_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        settings = settings_env(**SETTINGS, database_url=admin.rsplit("/", 1)[0] + f"/{name}")
        upgrade()
        yield settings
        shared_db.get_engine().dispose()
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                            marks=pytest.mark.postgres)])
def test_concurrent_dispatchers_never_claim_the_same_row(backend: str,
                                                         request: pytest.FixtureRequest) -> None:
    request.getfixturevalue("db" if backend == "sqlite" else "postgres_db")
    endpoint = add_endpoint()
    job_id = add_job()
    with session_scope() as s:
        for _ in range(40):
            outbox.record(s, job_id, "fine_tuning.job.checkpoint.created")
    claimed: list[int] = []
    lock, start = threading.Lock(), threading.Barrier(4)

    def dispatcher() -> None:
        start.wait()
        while (c := outbox.claim_next()) is not None:
            with lock:
                claimed.append(c.seq)

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    rows = deliveries()
    assert len(rows) == 40 and {r.endpoint_id for r in rows} == {endpoint}
    assert sorted(claimed) == sorted(r.seq for r in rows)  # each exactly once
    assert {r.attempts for r in rows} == {1}


def test_deliver_due_sends_until_nothing_is_due(db: Any, receiver: Receiver) -> None:
    good = add_endpoint(receiver.url("/hook"))
    flaky = add_endpoint(receiver.url("/flaky"), events=("fine_tuning.job.succeeded",))
    with session_scope() as s:
        outbox.record(s, add_job(), "fine_tuning.job.succeeded")
    assert outbox.deliver_due() == 2
    by_endpoint = {r.endpoint_id: r for r in deliveries()}
    assert (by_endpoint[good].status, by_endpoint[good].attempts) == ("delivered", 1)
    assert (by_endpoint[flaky].status, by_endpoint[flaky].last_status_code) == ("pending", 503)
    deadline = time.monotonic() + 30
    while by_endpoint[flaky].status == "pending" and time.monotonic() < deadline:
        outbox.deliver_due()
        time.sleep(0.05)
        by_endpoint = {r.endpoint_id: r for r in deliveries()}
    assert (by_endpoint[flaky].status, by_endpoint[flaky].attempts) == ("delivered", 2)
    assert len(receiver.accepted("/flaky")) == len(receiver.accepted("/hook")) == 1
