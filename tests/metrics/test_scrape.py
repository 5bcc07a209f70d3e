"""/metrics of a real installation (API, Celery worker, engine) scraped after a real job and
inference requests: the values are what happened."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.metrics.conftest import sample, scraped
from tests.support import create_job, upload_dialogsum, wait_for_status

pytestmark = pytest.mark.e2e

pytest.importorskip("torch")

from tests.engine import conftest as serving_conftest  # noqa: E402
from tests.engine.conftest import ServingStack  # noqa: E402

serving = serving_conftest.serving  # the live installation of the serving tests

# Port 0: the worker takes a free port and logs it, as several workers on one host would.
SERVING_SETTINGS = {"worker_metrics_port": 0}
STEPS = 6


def worker_metrics_url(serving: ServingStack, timeout: float = 60) -> str:
    """The address worker 0 logged for its /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(r"worker metrics on (http://\S+/metrics)",
                          serving.stack.workers[0].log())
        if found:
            return found.group(1)
        assert time.monotonic() < deadline, "the worker never logged its metrics address"
        time.sleep(0.2)


def scrape(url: str) -> dict[Any, float]:
    answer = httpx.get(url, timeout=30)
    assert answer.status_code == 200, answer.text
    return scraped(answer.text)


@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai()


@pytest.fixture(scope="module")
def job(client: openai.OpenAI, tiny_model: Path) -> Any:
    file = upload_dialogsum(client, 8)
    created = create_job(client, str(tiny_model), file.id, max_steps=STEPS, save_steps=STEPS)
    return wait_for_status(client, created.id, "succeeded", timeout=300)


@pytest.fixture(scope="module")
def usages(client: openai.OpenAI, job: Any) -> list[Any]:
    """One completion and one streamed chat reply from the fine-tuned model."""
    completion = client.completions.create(model=job.fine_tuned_model, prompt="Hello",
                                           max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft:nobody:has:this:model", prompt="x", max_tokens=1)
    return [completion.usage, chunks[-1].usage]


def test_the_api_counts_the_job_and_the_inference_per_model(serving: ServingStack, job: Any,
                                                            usages: list[Any]) -> None:
    text = httpx.get(f"{serving.stack.base_url}/metrics", timeout=30).text
    samples = scraped(text)
    model = job.fine_tuned_model

    assert sample(samples, "lorafleet_jobs", status="succeeded") == 1
    assert sample(samples, "lorafleet_jobs") == 1
    assert sample(samples, "lorafleet_queue_depth") == 0
    assert sample(samples, "lorafleet_inference_requests_total", model=model, status="200") == 2
    assert sample(samples, "lorafleet_inference_requests_total", model=model,
                  endpoint="chat.completions") == 1
    assert sample(samples, "lorafleet_inference_tokens_total", model=model,
                  type="completion") == sum(u.completion_tokens for u in usages)
    assert sample(samples, "lorafleet_inference_tokens_total", model=model,
                  type="prompt") == sum(u.prompt_tokens for u in usages)
    assert sample(samples, "lorafleet_inference_request_duration_seconds_count",
                  model=model) == 2
    assert sample(samples, "lorafleet_inference_time_to_first_token_seconds_count",
                  model=model) == 1
    # The unknown model was answered 404, and is no label.
    assert "ft:nobody" not in text
    assert sample(samples, "lorafleet_http_requests_total", route="/v1/completions",
                  status="404") == 1
    assert sample(samples, "lorafleet_http_requests_total", method="GET",
                  route="/v1/fine_tuning/jobs/{job_id}", status="200") >= 1


def test_the_worker_counts_the_attempt_its_steps_and_tokens(serving: ServingStack,
                                                            job: Any) -> None:
    url = worker_metrics_url(serving)
    samples = scrape(url)

    assert sample(samples, "lorafleet_job_attempts_total") == 1
    assert sample(samples, "lorafleet_job_requeues_total") == 0
    assert sample(samples, "lorafleet_job_duration_seconds_count", status="succeeded") == 1
    seconds = sample(samples, "lorafleet_job_duration_seconds_sum", status="succeeded")
    assert 0 <= seconds <= job.finished_at - job.created_at + 1
    assert sample(samples, "lorafleet_training_steps_total") == STEPS
    assert sample(samples, "lorafleet_training_tokens_total") == job.trained_tokens
    assert sample(samples, "lorafleet_training_step_duration_seconds_count") >= 1
    # The job is over: the worker reports no throughput (once its task has returned).
    deadline = time.monotonic() + 60
    while sample(samples, "lorafleet_training_tokens_per_second") != 0:
        assert time.monotonic() < deadline, "the worker still reports a throughput"
        time.sleep(0.2)
        samples = scrape(url)
