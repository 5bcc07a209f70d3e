"""The webhook endpoint routes in-process: bad input is a 4xx in OpenAI's error shape naming the
field and changes nothing; another project's endpoint does not exist."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.outbox import EVENT_TYPES

PUBLIC_URL = "https://8.8.8.8/hooks/lorafleet"  # an address literal: nothing to resolve


class Api:
    def __init__(self, client: TestClient):
        from api.auth import create_key
        from shared.db import session_scope

        self.client = client
        with session_scope() as s:
            self.keys = {p: create_key(s, p)[1] for p in ("p", "intruder")}

    def call(self, method: str, path: str, project: str = "p", **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[project]}"}
        return self.client.request(method, f"/v1{path}", headers=headers, **kwargs)


@pytest.fixture
def api(started_app: Callable[..., TestClient]) -> Api:
    return Api(started_app(webhook_poll_seconds=60))


def assert_error(answer: Any, status: int, param: str | None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    return error


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"url": "ftp://hooks.example.com/x"}, 400, "url"),
    ({"url": "hooks.example.com/x"}, 400, "url"),
    ({"url": "http://127.0.0.1:8080/hook"}, 400, "url"),
    ({"url": "http://169.254.169.254/latest/meta-data/"}, 400, "url"),
    ({"url": "http://metadata.google.internal/"}, 400, "url"),
    ({"url": "http://[::1]/hook"}, 400, "url"),
    ({"url": PUBLIC_URL, "event_types": ["fine_tuning.job.exploded"]}, 400, "event_types"),
    ({"url": PUBLIC_URL, "event_types": []}, 422, "event_types"),
    ({"url": PUBLIC_URL, "events": ["fine_tuning.job.failed"]}, 422, "events"),
    ({"event_types": ["fine_tuning.job.failed"]}, 422, "url"),
    ({"url": "https://" + "a" * 2100 + ".com"}, 422, "url"),
])
def test_bad_endpoints_are_refused_naming_the_field(api: Api, body: dict[str, Any],
                                                    status: int, param: str) -> None:
    assert_error(api.call("POST", "/webhook_endpoints", json=body), status, param)
    assert api.call("GET", "/webhook_endpoints").json()["data"] == []


def test_create_shows_the_secret_once_and_defaults_to_every_event(api: Api) -> None:
    created = api.call("POST", "/webhook_endpoints", json={"url": PUBLIC_URL, "name": "ci"})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "webhook_endpoint" and body["id"].startswith("whep_")
    assert body["event_types"] == list(EVENT_TYPES)
    assert body["signing_secret"].startswith("whsec_")
    assert body["signing_secret_hint"].endswith(body["signing_secret"][-4:])

    shown = api.call("GET", f"/webhook_endpoints/{body['id']}").json()
    assert "signing_secret" not in shown
    assert shown == {k: v for k, v in body.items() if k != "signing_secret"}
    listed = api.call("GET", "/webhook_endpoints").json()
    assert [e["id"] for e in listed["data"]] == [body["id"]] and not listed["has_more"]
    assert api.call("GET", "/webhook_event_types").json() == {"object": "list",
                                                              "data": list(EVENT_TYPES)}


def test_a_bad_update_changes_nothing(api: Api) -> None:
    endpoint = api.call("POST", "/webhook_endpoints", json={
        "url": PUBLIC_URL, "event_types": ["fine_tuning.job.succeeded"]}).json()
    path = f"/webhook_endpoints/{endpoint['id']}"
    assert_error(api.call("POST", path, json={"url": "http://10.0.0.1/x",
                                              "event_types": ["fine_tuning.job.failed"]}),
                 400, "url")
    assert_error(api.call("POST", path, json={"event_types": ["nope"]}), 400, "event_types")
    assert api.call("GET", path).json()["event_types"] == ["fine_tuning.job.succeeded"]

    changed = api.call("POST", path, json={"event_types": ["fine_tuning.job.failed"]}).json()
    assert changed["event_types"] == ["fine_tuning.job.failed"]
    assert changed["url"] == PUBLIC_URL


def test_rotation_replaces_the_secret(api: Api) -> None:
    endpoint = api.call("POST", "/webhook_endpoints", json={"url": PUBLIC_URL}).json()
    rotated = api.call("POST", f"/webhook_endpoints/{endpoint['id']}/rotate_secret",
                       json={"keep_old_secret_active_for_24_hours": True}).json()
    assert rotated["signing_secret"] != endpoint["signing_secret"]
    assert rotated["signing_secret"].startswith("whsec_")


def test_another_projects_endpoint_does_not_exist(api: Api) -> None:
    endpoint = api.call("POST", "/webhook_endpoints", json={"url": PUBLIC_URL}).json()
    path = f"/webhook_endpoints/{endpoint['id']}"
    for method, suffix, body in [("GET", "", None), ("POST", "", {"name": "mine"}),
                                 ("DELETE", "", None), ("GET", "/deliveries", None),
                                 ("POST", "/rotate_secret", {}),
                                 ("POST", "/test", {"event_type": "fine_tuning.job.failed"})]:
        answer = api.call(method, path + suffix, project="intruder", json=body)
        assert_error(answer, 404, "webhook_endpoint_id")
    assert api.call("GET", "/webhook_endpoints", project="intruder").json()["data"] == []
    assert api.call("GET", path).json() == {k: v for k, v in endpoint.items()
                                            if k != "signing_secret"}


def test_delete_then_not_found(api: Api) -> None:
    endpoint = api.call("POST", "/webhook_endpoints", json={"url": PUBLIC_URL}).json()
    path = f"/webhook_endpoints/{endpoint['id']}"
    assert api.call("DELETE", path).json() == {"id": endpoint["id"], "deleted": True,
                                               "object": "webhook_endpoint.deleted"}
    assert_error(api.call("GET", path), 404, "webhook_endpoint_id")
    assert_error(api.call("GET", "/webhook_endpoints/whep_nope/deliveries"), 404,
                 "webhook_endpoint_id")
    assert_error(api.call("GET", "/webhook_endpoints/%00/deliveries"), 404,
                 "webhook_endpoint_id")


def test_endpoints_need_a_key(api: Api) -> None:
    assert api.client.get("/v1/webhook_endpoints").status_code == 401
