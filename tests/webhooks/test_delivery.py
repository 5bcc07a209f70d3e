"""Webhooks through real processes: the API and a Celery worker send a job's events to a real
HTTP receiver, signed so that the openai SDK's ``client.webhooks.unwrap`` verifies them, retried
while the receiver answers 503 or is down, and never lost when the API stops or restarts."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from shared.outbox import EVENT_TYPES
from tests.resilience.conftest import start_stack
from tests.support import Stack, create_job, list_all_events, upload_dialogsum, wait_for_status
from tests.support.stack import CLI
from tests.webhooks.receiver import Receiver, wait_until

pytestmark = pytest.mark.e2e

# Short retries so that three failed sends take about a second; attempts never run out here.
WEBHOOKS = {"webhook_backoff_seconds": 0.2, "webhook_max_backoff_seconds": 0.5,
            "webhook_max_attempts": 10_000, "webhook_timeout_seconds": 2,
            "webhook_poll_seconds": 0.1, "webhook_allow_private_targets": "true"}
SUCCEEDED, CHECKPOINT = "fine_tuning.job.succeeded", "fine_tuning.job.checkpoint.created"


@pytest.fixture(scope="module")
def stack(make_module_stack: Any, tiny_model: Path) -> Stack:
    return start_stack(make_module_stack, tiny_model, workers=1, **WEBHOOKS)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.openai()


@pytest.fixture(scope="module")
def file_id(client: openai.OpenAI) -> str:
    return upload_dialogsum(client, 32).id


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first={"/all": 3}).start()
    yield server
    server.stop()


def verified(received: list[Any], secret: str) -> list[Any]:
    """Every request's body, checked and parsed by the openai SDK."""
    sdk = openai.OpenAI(api_key="unused")
    return [sdk.webhooks.unwrap(r.body, r.headers, secret=secret) for r in received]


def deliveries(stack: Stack, endpoint_id: str) -> list[dict[str, Any]]:
    answer = stack.http().get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries",
                              params={"limit": 100})
    answer.raise_for_status()
    return list(answer.json()["data"])


def test_endpoints_are_managed_with_the_openai_sdk(client: openai.OpenAI,
                                                   receiver: Receiver) -> None:
    created = client.webhooks.create(url=receiver.url("/sdk"), name="ci",
                                     event_types=["fine_tuning.job.failed"])
    assert created.signing_secret.startswith("whsec_") and created.id.startswith("whep_")
    assert client.webhooks.retrieve(created.id).event_types == ["fine_tuning.job.failed"]
    updated = client.webhooks.update(created.id, name="renamed",
                                     event_types=["fine_tuning.job.succeeded"])
    assert (updated.name, updated.event_types) == ("renamed", ["fine_tuning.job.succeeded"])
    assert created.id in [e.id for e in client.webhooks.list()]
    assert client.webhooks.event_types.list().data == list(EVENT_TYPES)

    rotated = client.webhooks.rotate_secret(created.id)
    tested = client.webhooks.test(created.id, event_type="fine_tuning.job.succeeded")
    assert (tested.status_code, tested.event_type) == (200, "fine_tuning.job.succeeded")
    [event] = verified(receiver.requests("/sdk"), rotated.signing_secret)
    assert event.type == "fine_tuning.job.succeeded"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verified(receiver.requests("/sdk"), created.signing_secret)

    with pytest.raises(openai.BadRequestError) as refused:
        client.webhooks.create(url="ftp://hooks.example.com/", name="x",
                               event_types=["fine_tuning.job.failed"])
    assert refused.value.param == "url"
    assert client.webhooks.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(created.id)


def test_each_event_arrives_once_verified_after_three_503s(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path,
        receiver: Receiver) -> None:
    every = client.webhooks.create(url=receiver.url("/all"), name="all",
                                   event_types=list(EVENT_TYPES))  # type: ignore[arg-type]
    done = client.webhooks.create(url=receiver.url("/done"), name="done",
                                  event_types=[SUCCEEDED])
    job = create_job(client, str(tiny_model), file_id)
    wait_for_status(client, job.id, "succeeded", timeout=300)
    steps = [int(e.message.rsplit(" ", 1)[1]) for e in list_all_events(client, job.id)
             if e.message.startswith("Checkpoint saved at step ")]
    assert steps, "the job saved no checkpoint"

    wait_until(lambda: len(receiver.accepted("/all")) == len(steps) + 1
               and receiver.accepted("/done"), what="every event accepted once")
    wait_until(lambda: {d["status"] for d in deliveries(stack, every.id)} == {"delivered"},
               what="every delivery marked delivered")

    # Every send, the refused ones too, carries a valid signature and the event's id.
    for r, event in zip(receiver.requests("/all"), verified(receiver.requests("/all"),
                                                            every.signing_secret),
                        strict=True):
        assert r.webhook_id == event.id and event.object == "event"
        assert event.data.id == job.id
    accepted = verified(list(receiver.accepted("/all").values()), every.signing_secret)
    assert sorted(e.type for e in accepted) == sorted([CHECKPOINT] * len(steps) + [SUCCEEDED])
    assert sorted(e.data.step_number for e in accepted if e.type == CHECKPOINT) == sorted(steps)
    sends = {}
    for r in receiver.requests("/all"):
        sends[r.webhook_id] = sends.get(r.webhook_id, []) + [r.status]
    assert all(s == [503, 503, 503, 200] for s in sends.values()), sends

    [only] = verified(list(receiver.accepted("/done").values()), done.signing_secret)
    assert (only.type, only.data.id) == (SUCCEEDED, job.id)
    assert len(receiver.requests("/done")) == 1

    listed = deliveries(stack, every.id)
    assert len(listed) == len(steps) + 1 and listed[0]["event_type"] == SUCCEEDED  # newest
    for d in listed:
        assert (d["status"], d["attempts"], d["last_status_code"]) == ("delivered", 4, 200)
        assert d["id"] in sends and d["payload"]["id"] == d["id"]
        assert d["fine_tuning_job_id"] == job.id and d["next_attempt_at"] is None
    [d] = deliveries(stack, done.id)
    assert (d["status"], d["attempts"], d["id"]) == ("delivered", 1, only.id)
    for endpoint in (every, done):
        client.webhooks.delete(endpoint.id)


def test_the_worker_sends_what_ended_while_the_api_is_down(
        stack: Stack, client: openai.OpenAI, file_id: str, tiny_model: Path) -> None:
    later = Receiver()  # not listening yet
    endpoint = client.webhooks.create(url=later.url("/late"), name="late",
                                      event_types=[SUCCEEDED])
    job = create_job(client, str(tiny_model), file_id)
    wait_for_status(client, job.id, "running", timeout=120)
    assert stack.api is not None
    stack.api.popen.send_signal(signal.SIGTERM)
    stack.api.popen.wait(timeout=30)
    try:
        wait_until(lambda: stack.sql("SELECT status FROM jobs WHERE id = :id",
                                     id=job.id)[0].status == "succeeded",
                   timeout=300, what="the job to end")
        wait_until(lambda: stack.sql("SELECT last_error FROM webhook_deliveries WHERE "
                                     "endpoint_id = :e", e=endpoint.id)[0].last_error,
                   what="a send that finds nobody listening")
        later.start()
        wait_until(lambda: later.accepted("/late"), what="the delivery, from the worker")
    finally:
        later.stop()
        stack.api.close_log()
        stack.api = stack._spawn("api", [*CLI, "api"])
        stack.wait_healthy()
    [event] = verified(list(later.accepted("/late").values()), endpoint.signing_secret)
    assert (event.type, event.data.id) == (SUCCEEDED, job.id)
    [d] = deliveries(stack, endpoint.id)
    assert (d["status"], d["last_status_code"]) == ("delivered", 200) and d["attempts"] >= 2


def test_an_api_restart_between_the_end_and_the_delivery_loses_nothing(
        make_stack: Any, tiny_model: Path) -> None:
    """No worker here: only the API sends, and the API that recorded the event is killed."""
    stack = start_stack(make_stack, tiny_model, workers=0, **WEBHOOKS)
    client = stack.openai()
    later = Receiver()  # down while the job ends
    endpoint = client.webhooks.create(url=later.url("/late"), name="late",
                                      event_types=["fine_tuning.job.cancelled"])
    job = create_job(client, str(tiny_model), upload_dialogsum(client, 8).id)
    wait_for_status(client, job.id, "queued")
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    wait_until(lambda: (d := deliveries(stack, endpoint.id)) and d[0]["last_error"],
               what="a send that finds nobody listening")

    assert stack.api is not None
    stack.api.signal_group(signal.SIGKILL)  # no shutdown at all: a crash
    stack.api.popen.wait(timeout=30)
    stack.api.close_log()
    later.start()
    try:
        stack.api = stack._spawn("api", [*CLI, "api"])
        stack.wait_healthy()
        wait_until(lambda: later.accepted("/late"), what="the delivery after the restart")
    finally:
        later.stop()
    [event] = verified(list(later.accepted("/late").values()), endpoint.signing_secret)
    assert (event.type, event.data.id) == ("fine_tuning.job.cancelled", job.id)
    [d] = deliveries(stack, endpoint.id)
    assert (d["status"], d["last_status_code"]) == ("delivered", 200) and d["attempts"] >= 2
    assert len(later.accepted("/late")) == 1


def test_a_dpo_job_sends_the_same_events(client: openai.OpenAI, tiny_model: Path,
                                         receiver: Receiver) -> None:
    """Webhooks know no method: a DPO job's checkpoints and end arrive as a supervised job's."""
    from tests.support.preference import upload_preference

    hook = client.webhooks.create(url=receiver.url("/dpo"), name="dpo",
                                  event_types=[SUCCEEDED, CHECKPOINT])
    job = create_job(client, str(tiny_model), upload_preference(client, 8).id,
                     method={"type": "dpo"}, max_steps=4, save_steps=2, max_length=1024)
    wait_for_status(client, job.id, "succeeded", timeout=300)

    wait_until(lambda: len(receiver.accepted("/dpo")) == 3, what="two checkpoints and the end")
    events = verified(list(receiver.accepted("/dpo").values()), hook.signing_secret)
    assert sorted((e.type, getattr(e.data, "step_number", None)) for e in events) == [
        (CHECKPOINT, 2), (CHECKPOINT, 4), (SUCCEEDED, None)]
    assert all(e.data.id == job.id for e in events)
    client.webhooks.delete(hook.id)
