"""The embedded broker hands consumers whole messages only, and a message that does not parse
is dropped instead of stopping the worker (kombu's filesystem transport, celery/kombu#1551)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection
from kombu.exceptions import ChannelError

from shared import broker
from shared.queue import RUN_JOB_TASK, celery_config
from shared.settings import Settings

QUEUE = "lorafleet.train"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_dir=tmp_path / "storage", broker_url="", queue=QUEUE)


@pytest.fixture
def app(settings: Settings) -> Celery:
    app = Celery("lorafleet-test")
    app.conf.update(celery_config(settings))
    return app


@pytest.fixture
def channel(app: Celery) -> Iterator[Any]:
    with app.connection_for_write() as conn:
        yield conn.default_channel


def messages(settings: Settings) -> list[str]:
    return sorted(os.listdir(settings.broker_dir / "queue"))


def test_the_embedded_broker_uses_this_transport(app: Celery, settings: Settings) -> None:
    assert app.conf.broker_transport == broker.TRANSPORT
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, broker.Transport)
    redis = Settings(storage_dir=settings.storage_dir, broker_url="redis://127.0.0.1:6379/0")
    assert "broker_transport" not in celery_config(redis)  # Redis keeps its own transport


def test_a_sent_task_is_one_whole_message_file(app: Celery, settings: Settings) -> None:
    app.send_task(RUN_JOB_TASK, args=["ftjob-1"], queue=QUEUE)
    files = messages(settings)
    assert len(files) == 1 and files[0].endswith(f".{QUEUE}.msg"), files
    payload = json.loads((settings.broker_dir / "queue" / files[0]).read_text())
    assert payload["headers"]["task"] == RUN_JOB_TASK
    assert payload["headers"]["argsrepr"] == "['ftjob-1']"


def test_a_consumer_sees_nothing_until_the_message_is_complete(
    channel: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the last moment before the message appears, its bytes are all on disk and a consumer
    polling the queue still finds nothing; right after, it finds the whole message."""
    real_replace = os.replace
    seen: dict[str, Any] = {}

    def replace(src: str, dst: str) -> None:
        seen["partial"] = json.loads(Path(src).read_text())  # complete before it is visible
        with pytest.raises(broker.filesystem.Empty):
            channel._get(QUEUE)
        real_replace(src, dst)

    monkeypatch.setattr(broker.os, "replace", replace)
    channel._put(QUEUE, {"body": "wake up", "n": 1})
    assert seen["partial"] == {"body": "wake up", "n": 1}
    assert channel._get(QUEUE) == {"body": "wake up", "n": 1}
    assert messages(settings) == []  # taken, and no partial file left behind


def test_an_unreadable_message_is_dropped_and_the_next_one_delivered(
    channel: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty and a truncated message file (what kombu's own writer can leave for a moment)
    are skipped with a warning; the consumer gets the next good message and goes on."""
    folder = settings.broker_dir / "queue"
    (folder / broker.message_name(QUEUE, 1)).write_text("")  # sent before the good one
    (folder / broker.message_name(QUEUE, 2)).write_text('{"body": "trunc')
    channel._put(QUEUE, {"body": "good"})
    with caplog.at_level(logging.WARNING, logger=broker.__name__):
        assert channel._get(QUEUE) == {"body": "good"}
    dropped = [r for r in caplog.records if "dropped an unreadable message" in r.message]
    assert len(dropped) == 2
    assert messages(settings) == []
    with pytest.raises(broker.filesystem.Empty):
        channel._get(QUEUE)


def test_a_message_that_cannot_be_written_leaves_nothing(
    channel: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(broker.os, "replace", fail)
    with pytest.raises(ChannelError, match="Cannot add file"):
        channel._put(QUEUE, {"body": "x"})
    assert messages(settings) == []


def test_a_worker_side_connection_reads_what_the_api_side_sent(
    app: Celery, settings: Settings
) -> None:
    """Two connections, as the API and a worker hold: the task sent by one is received, whole,
    by a consumer on the other."""
    app.send_task(RUN_JOB_TASK, args=["ftjob-2"], queue=QUEUE)
    with Connection(app.conf.broker_url, transport=broker.TRANSPORT,
                    transport_options=app.conf.broker_transport_options) as conn:
        message = conn.SimpleQueue(QUEUE).get(timeout=5)
        try:
            assert message.headers["task"] == RUN_JOB_TASK
            assert message.headers["argsrepr"] == "['ftjob-2']"
        finally:
            message.ack()


def test_messages_come_out_in_the_order_they_were_sent(
    channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across a change in the stamp's digit count (999,999 ms, then 1,000,000 ms), the first
    message sent is the first received; with kombu's unpadded names the second came first."""
    clock = iter([999.999, 1000.0])
    monkeypatch.setattr(broker, "monotonic", lambda: next(clock))
    channel._put(QUEUE, {"body": "first"})
    channel._put(QUEUE, {"body": "second"})
    assert [channel._get(QUEUE)["body"], channel._get(QUEUE)["body"]] == ["first", "second"]
