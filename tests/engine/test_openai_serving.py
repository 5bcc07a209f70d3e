"""Serving through the API with the official ``openai`` client: real processes (API, Celery
worker, engine), adapters trained by real jobs while the server runs."""

from __future__ import annotations

import concurrent.futures
import json
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from shared.ids import fine_tuned_model_name
from shared.templates import PromptFormat, render_prompt
from tests.engine.conftest import ServingStack
from tests.support import create_job, dialogsum_records, jsonl_bytes, upload_bytes, wait_for_status

pytestmark = pytest.mark.e2e

MAX_TOKENS_LIMIT = 1000
SERVING_SETTINGS = {"max_tokens_limit": MAX_TOKENS_LIMIT, "max_queued_requests": 2,
                    "batch_window_ms": 20}
# Enough steps at a high rate for the tiny model to write DialogSum-style summaries that end
# with the format's end marker (a few seconds on a CPU).
SUMMARIZER = {"max_steps": 120, "learning_rate": 3e-3, "batch_size": 4, "save_steps": 30,
              "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "seed": 1}


@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai()


@pytest.fixture(scope="module")
def records(tiny_tokenizer: Any) -> list[dict[str, Any]]:
    """The four shortest of the first 200 DialogSum training dialogues."""
    pool = dialogsum_records(200)
    return sorted(pool, key=lambda r: len(tiny_tokenizer(r["dialogue"])["input_ids"]))[:4]


@pytest.fixture(scope="module")
def summarizer(client: openai.OpenAI, tiny_model: Path, records: list[dict[str, Any]]) -> Any:
    """A DialogSum adapter, trained by a job submitted after the engine started."""
    file = upload_bytes(client, jsonl_bytes(records), "dialogsum-4.jsonl")
    job = create_job(client, str(tiny_model), file.id, suffix="dsum", **SUMMARIZER)
    return wait_for_status(client, job.id, "succeeded", timeout=300)


def test_models_list_shows_base_and_fine_tuned_models(serving: ServingStack, client: Any,
                                                      summarizer: Any) -> None:
    ids = [m.id for m in client.models.list()]
    assert summarizer.fine_tuned_model in ids
    assert summarizer.model in ids  # its base model
    assert client.models.retrieve(summarizer.fine_tuned_model).owned_by == "org-test"
    # Another project sees none of them, and cannot use them.
    other = serving.stack.openai(key=serving.stack.create_key("other"))
    assert list(other.models.list()) == []
    with pytest.raises(openai.NotFoundError):
        other.completions.create(model=summarizer.fine_tuned_model, prompt="hi", max_tokens=4)


def test_completion_of_a_dialogue_is_a_summary(client: Any, summarizer: Any,
                                               records: list[dict[str, Any]]) -> None:
    dialogue = records[0]["dialogue"]
    result = client.completions.create(model=summarizer.fine_tuned_model, prompt=dialogue,
                                       max_tokens=120, temperature=0)
    choice = result.choices[0]
    assert result.object == "text_completion" and result.model == summarizer.fine_tuned_model
    # A DialogSum-style summary, cut at the format's end marker ("### End").
    assert choice.text.startswith("#Person"), choice.text
    assert "###" not in choice.text and choice.finish_reason == "stop"
    assert result.usage.completion_tokens > 3
    # The server wrapped the dialogue in the adapter's prompt format: sending the wrapped
    # prompt raw gives the same completion.
    fmt = PromptFormat.model_validate(summarizer.prompt_format)
    raw = client.completions.create(model=summarizer.fine_tuned_model, max_tokens=120,
                                    prompt=render_prompt(fmt, dialogue), temperature=0,
                                    extra_body={"raw_prompt": True})
    assert raw.choices[0].text.startswith(choice.text)
    assert raw.usage.prompt_tokens == result.usage.prompt_tokens


def test_chat_completion_and_its_stream(client: Any, summarizer: Any,
                                        records: list[dict[str, Any]]) -> None:
    dialogue = records[1]["dialogue"]
    messages = [{"role": "user", "content": dialogue}]
    completion = client.completions.create(model=summarizer.fine_tuned_model, prompt=dialogue,
                                           max_tokens=120, temperature=0)
    chat = client.chat.completions.create(model=summarizer.fine_tuned_model, messages=messages,
                                          max_tokens=120, temperature=0)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.choices[0].finish_reason == completion.choices[0].finish_reason

    stream = client.chat.completions.create(
        model=summarizer.fine_tuned_model, messages=messages, max_tokens=120, temperature=0,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)  # the SDK ends the iteration at "data: [DONE]"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == chat.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1


def test_a_client_that_leaves_a_stream_stops_its_generation(serving: ServingStack,
                                                             summarizer: Any) -> None:
    if serving.backend == "vllm":
        pytest.skip("on vLLM the stream can end before the client leaves: "
                    "test_a_client_that_gives_up_waiting_stops_its_generation[stream] pauses "
                    "vLLM instead")
    before = serving.engine_stats()["rows_cancelled"]
    http = serving.stack.http()
    body = {"model": summarizer.model, "prompt": "Once upon a time", "max_tokens": 1000,
            "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("data: {")
    # The API closed its stream to the engine, which stopped that row at its next token.
    deadline = time.monotonic() + 60
    while serving.engine_stats()["rows_cancelled"] == before:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.1)


def wait_until(condition: Callable[[], bool], failure: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


def upstream_ports(api: psutil.Process, engine_port: int) -> set[int]:
    """The API's open connections to the engine, by their local port."""
    return {c.laddr.port for c in api.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == engine_port and c.status == psutil.CONN_ESTABLISHED}


def send_and_wait(port: int, key: str, path: str, body: dict[str, Any]) -> socket.socket:
    """POST ``body`` on a raw connection, as a client that waits for the answer; it gives up
    when the caller closes the socket (a client timeout, without a clock in the test)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                 .encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_client_that_gives_up_waiting_stops_its_generation(serving: ServingStack,
                                                              summarizer: Any,
                                                              stream: bool) -> None:
    # What generates (the built-in engine, or the vLLM server behind the engine) is paused
    # (SIGSTOP) while the request waits for its answer, and the client gives up meanwhile, so
    # the generation cannot end first, however fast the machine. vLLM is paused before the
    # request is sent (the engine admits it without asking vLLM, and it then waits on vLLM);
    # the built-in engine, which must answer the stats read, once it is seen generating. Once
    # the API has hung up on the engine, the engine must stop the generation: the built-in
    # engine at its next token once it resumes, the vLLM gateway at once, by dropping its
    # request to vLLM (which aborts it). A stream the same: vLLM has not answered, so neither
    # has the engine nor the API, and both must notice the client leaving.
    if stream and serving.backend != "vllm":
        pytest.skip("the built-in engine starts a stream at once: "
                    "test_a_client_that_leaves_a_stream_stops_its_generation covers it")
    assert serving.stack.api is not None
    api = psutil.Process(serving.stack.api.pid)
    engine_port = int(serving.engine_url.rsplit(":", 1)[1])
    wait_until(lambda: not serving.engine_stats()["busy"], "the engine stayed busy")
    before = serving.engine_stats()
    answered = "batches" if serving.backend == "builtin" else "requests"
    paused = serving.generating_processes()
    early = serving.backend == "vllm"
    body = {"model": summarizer.model, "prompt": "Hello", "max_tokens": MAX_TOKENS_LIMIT,
            "temperature": 0, "stream": stream}
    if early:
        for process in paused:
            process.suspend()
    try:
        client = send_and_wait(serving.stack.port, serving.stack.key, "/v1/completions", body)
        try:
            def generating() -> bool:
                stats = serving.engine_stats()
                answer_arrived = select.select([client], [], [], 0)[0]
                assert stats[answered] == before[answered] and not answer_arrived, (
                    "the request ended before its generation was seen")
                return bool(stats["busy"])

            wait_until(generating, "the generation did not start")
            if not early:
                for process in paused:
                    process.suspend()
            upstream = upstream_ports(api, engine_port)
            client.close()  # the client gives up
            wait_until(lambda: not upstream <= upstream_ports(api, engine_port),
                       "the API kept waiting for a gone client")
            if early:
                wait_until(lambda: serving.engine_stats()["rows_cancelled"]
                           > before["rows_cancelled"],
                           "the engine kept its request to vLLM for a gone client")
        finally:
            client.close()
    finally:
        for process in paused:
            process.resume()
    wait_until(lambda: serving.engine_stats()["rows_cancelled"] > before["rows_cancelled"],
               "the engine kept generating for a gone client")


def test_base_model_is_served(client: Any, summarizer: Any) -> None:
    result = client.completions.create(model=summarizer.model, prompt=["Hello", "Good"],
                                       max_tokens=5, temperature=0, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert result.choices[0].text == result.choices[1].text  # greedy: n copies
    assert all(c.finish_reason in ("stop", "length") for c in result.choices)


def test_a_job_that_finishes_while_serving_is_servable(serving: ServingStack, client: Any,
                                                       tiny_model: Path,
                                                       records: list[dict[str, Any]]) -> None:
    file = upload_bytes(client, jsonl_bytes(records), "late.jsonl")
    job = create_job(client, str(tiny_model), file.id, suffix="late", max_steps=30)
    name = fine_tuned_model_name(job.model, "late", job.id)
    with pytest.raises(openai.ConflictError) as not_yet:
        client.completions.create(model=name, prompt="hi", max_tokens=4)
    assert not_yet.value.code == "model_not_ready"

    done = wait_for_status(client, job.id, "succeeded", timeout=300)
    assert done.fine_tuned_model == name
    result = client.completions.create(model=name, prompt=records[2]["dialogue"],
                                       max_tokens=8, temperature=0)
    assert result.model == name and result.usage.completion_tokens >= 1
    assert name in [m.id for m in client.models.list()]
    loaded = serving.engine_stats()["base_models"][str(tiny_model)]
    assert loaded["adapter_loads"] >= 2


def test_bad_requests(client: Any, summarizer: Any, tiny_model: Path) -> None:
    name = summarizer.fine_tuned_model
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name.rsplit(":", 1)[0] + ":ftjob-nope",
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=name, prompt="word " * 1100, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=name, max_tokens=MAX_TOKENS_LIMIT + 1,
                                       messages=[{"role": "user", "content": "hi"}])
    assert too_many.value.code == "invalid_value" and too_many.value.param == "max_tokens"
    assert too_many.value.body["message"].startswith("max_tokens is")


def test_a_cancelled_job_model_is_a_conflict(client: Any, tiny_model: Path,
                                             records: list[dict[str, Any]]) -> None:
    file = upload_bytes(client, jsonl_bytes(records), "cancelled.jsonl")
    job = create_job(client, str(tiny_model), file.id, max_steps=1000)
    client.fine_tuning.jobs.cancel(job.id)
    wait_for_status(client, job.id, "cancelled", timeout=120)
    with pytest.raises(openai.ConflictError) as caught:
        client.completions.create(model=fine_tuned_model_name(job.model, None, job.id),
                                  prompt="hi", max_tokens=4)
    assert "cancelled" in caught.value.message


def test_a_full_queue_answers_429_with_retry_after(serving: ServingStack, client: Any,
                                                   summarizer: Any) -> None:
    def ask(i: int) -> Any:
        try:
            # The base model rarely ends early: every request keeps the engine busy.
            return client.completions.create(model=summarizer.model, prompt=f"request {i}",
                                              max_tokens=48, temperature=0)
        except openai.APIStatusError as e:
            return e

    outcomes: list[Any] = []
    for _ in range(3):  # a burst of 40 against a queue of 2; retried if the engine kept up
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(ask, range(40)))
        if any(isinstance(o, openai.RateLimitError) for o in outcomes):
            break
    refused = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    assert refused, "no request was refused"
    for error in refused:
        assert isinstance(error, openai.RateLimitError), error
        assert int(error.response.headers["retry-after"]) >= 1
        assert error.code == "rate_limit_exceeded"
    assert any(not isinstance(o, Exception) for o in outcomes)
    # Nothing crashed and nothing is left waiting.
    assert client.completions.create(model=summarizer.fine_tuned_model, prompt="after",
                                     max_tokens=2).choices
    assert serving.engine_stats()["queued"] == 0


def test_a_dpo_job_from_openais_files_is_trained_and_served(
        serving: ServingStack, client: Any, tiny_model: Path) -> None:
    """The preference rows of OpenAI's formats through the SDK: a DPO file is uploaded as
    ``preference``, a job with ``method: dpo`` trains it, its adapter loads with peft, and the
    API serves it (on vLLM, once its parity probe, recorded at the end of training, passed)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.support.preference import OPENAI_EXAMPLE, preference_pairs
    from worker.training.probe import PROBE_INPUT

    file = upload_bytes(client, jsonl_bytes([OPENAI_EXAMPLE, *preference_pairs(7)]),
                        "preference.jsonl")
    assert file.record_format == "preference"
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=file.id, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 4,
                                                           "n_epochs": 1}}},
        extra_body={"lora": {"r": 4, "alpha": 8}, "max_length": 1024})
    done = wait_for_status(client, job.id, "succeeded", timeout=300)
    assert done.method.type == "dpo" and done.method.dpo.hyperparameters.beta == 0.1

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                                       done.adapter_path)
    probe = json.loads(Path(done.adapter_path, "lorafleet.json").read_text())["parity_probe"]
    checks = serving.engine_stats().get("parity_checks", 0)
    answer = client.completions.create(model=done.fine_tuned_model, prompt=PROBE_INPUT,
                                       max_tokens=probe["max_new_tokens"], temperature=0)
    chat = client.chat.completions.create(
        model=done.fine_tuned_model, max_tokens=8, temperature=0,
        messages=OPENAI_EXAMPLE["input"]["messages"])

    assert list(loaded.peft_config) == ["default"]
    assert probe["token_ids"], "the probe was recorded at the end of training"
    assert answer.model == done.fine_tuned_model and answer.usage.completion_tokens >= 1
    if serving.backend == "vllm":  # loaded there for this request, its probe checked
        assert serving.engine_stats()["parity_checks"] == checks + 1
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
