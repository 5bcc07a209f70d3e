"""The engine on vLLM, through the API: greedy output equal to peft's for every prompt format,
the parity probe refusing an adapter whose weights changed, the rank limit, adapters served
without a restart, a vLLM server that dies, streams relayed and aborted, a larger adapter that
restarts the server at a higher rank.

Adapters are built with known random weights (and the worker's parity probe) in the folders of
succeeded jobs written straight into the database: no training needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from shared.ids import fine_tuned_model_name, new_id, now
from shared.schemas import LoraSpec, TrainingSpec
from shared.templates import PromptFormat, render_prompt, stop_sequences
from tests.engine.conftest import ServingStack, build_adapter, vllm_available, vllm_metric

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not vllm_available() and not os.environ.get("CI"),
    reason="no .venv-vllm (`make venv-vllm`; make test creates it where vLLM installs)")]

MAX_LORA_RANK = 16
SERVING_SETTINGS = {"engine_backend": "vllm", "vllm_max_lora_rank": MAX_LORA_RANK,
                    "max_tokens_limit": 1000}
SERVING_WORKERS = 0  # the adapters are built by the tests, no job trains
# What is tested is how the engine starts, widens and replaces its own servers.
SERVING_OWN_VLLM = True

FORMATS: dict[str, dict[str, Any]] = {
    "dolly": {"type": "dolly", "instruction": "Summarize the below conversation."},
    "phi2-qa": {"type": "phi2-qa"},
    "chat": {"type": "chat"},
    "custom": {"type": "custom", "prompt_template": "Dialogue:\n{input}\nSummary:",
               "response_template": " {output}", "end": "\n###"},
}
DIALOGUE = "#Person1#: Hi, how are you today?\n#Person2#: Fine, thanks. And you?"
TOKENS = 24


def add_adapter(serving: ServingStack, base: Path, seed: int, fmt: dict[str, Any], *,
                r: int = 8, probe: bool = True) -> tuple[str, Path]:
    """A succeeded job of the stack's project whose adapter has random weights from ``seed``;
    its fine-tuned model name and adapter folder."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from shared.models import Job

    stack = serving.stack
    job_id = new_id("ftjob")
    folder = build_adapter(base, stack.storage_dir / "jobs" / job_id / "adapter", seed,
                           prompt_format=fmt, r=r, probe=probe)
    spec = TrainingSpec(model=str(base), training_file="file-x", lora=LoraSpec(r=r),
                        prompt_format=PromptFormat.model_validate(fmt), max_length=1024,
                        max_steps=1, n_epochs=1, batch_size=1, gradient_accumulation_steps=1,
                        learning_rate=1e-4, warmup=0, save_steps=1, logging_steps=1,
                        train_on_inputs=False, packing=False, seed=0)
    name = fine_tuned_model_name(str(base), "t", job_id)
    engine = create_engine(stack.database_url)
    try:
        with Session(engine) as session:
            session.add(Job(id=job_id, project=stack.project, created_at=now(), model=str(base),
                            suffix="t", status="succeeded", training_file="file-x",
                            spec=spec.model_dump(mode="json"), seed=0, fine_tuned_model=name,
                            adapter_dir=f"jobs/{job_id}/adapter"))
            session.commit()
    finally:
        engine.dispose()
    return name, folder


def expected_completion(tokenizer: Any, generated: list[int], stop_ids: set[int],
                        stops: list[str]) -> tuple[str, int]:
    """The text and token count a served completion of ``generated`` (peft's greedy tokens)
    must have: cut at a stop token or a stop string."""
    kept: list[int] = []
    for token in generated:
        if token in stop_ids:
            break
        kept.append(token)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            return text[:min(cuts)], len(kept)
    return tokenizer.decode(kept, skip_special_tokens=True), len(kept)


@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai(timeout=600)  # a request may wait for a vLLM server to start


@pytest.fixture(scope="module")
def by_format(serving: ServingStack, tiny_model: Path) -> dict[str, tuple[str, Path]]:
    """One adapter per prompt format, each with different random weights."""
    return {name: add_adapter(serving, tiny_model, 200 + i, fmt)
            for i, (name, fmt) in enumerate(FORMATS.items())}


def engine_view(serving: ServingStack, base: Path) -> dict[str, Any]:
    """What the engine says of the vLLM server of ``base``."""
    return dict(serving.engine_stats()["base_models"][str(base)])


def view_after_a_request(serving: ServingStack, client: openai.OpenAI, base: Path,
                         by_format: dict[str, tuple[str, Path]]) -> dict[str, Any]:
    """:func:`engine_view` once an adapter's request has been served."""
    name, _ = by_format["dolly"]
    client.completions.create(model=name, prompt=DIALOGUE, max_tokens=2, temperature=0)
    return engine_view(serving, base)


def vllm_pid(serving: ServingStack, base: Path) -> int:
    return int(engine_view(serving, base)["pid"])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_greedy_output_equals_peft_for_every_prompt_format(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path, tiny_tokenizer: Any,
    by_format: dict[str, tuple[str, Path]], reference: Callable[..., list[int]], fmt: str,
) -> None:
    name, folder = by_format[fmt]
    prompt_format = PromptFormat.model_validate(FORMATS[fmt])
    renderer = None
    if fmt == "chat":
        def renderer(messages: list[dict[str, str]], add: bool) -> str:
            return tiny_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add)
    prompt = render_prompt(prompt_format, DIALOGUE, renderer)
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated = reference(folder, prompt_ids, TOKENS)
    stop_ids = {tiny_tokenizer.eos_token_id}
    if fmt == "chat":
        stop_ids.add(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    text, count = expected_completion(tiny_tokenizer, generated, stop_ids,
                                      stop_sequences(prompt_format))

    result = client.completions.create(model=name, prompt=DIALOGUE, max_tokens=TOKENS,
                                       temperature=0)
    assert result.model == name
    assert result.choices[0].text == text
    assert result.usage.completion_tokens == count
    assert result.usage.prompt_tokens == len(prompt_ids)
    # A chat request with one user message takes the same prompt.
    chat = client.chat.completions.create(model=name, max_tokens=TOKENS, temperature=0,
                                          messages=[{"role": "user", "content": DIALOGUE}])
    assert chat.choices[0].message.content == text
    assert chat.usage.completion_tokens == count
    # The adapter passed its parity probe on loading.
    stats = serving.engine_stats()
    assert stats["backend"] == "vllm" and stats["adapters_refused"] == 0
    assert stats["parity_checks"] >= 1


def test_base_model_output_equals_the_base_model(client: openai.OpenAI, tiny_model: Path,
                                                 tiny_tokenizer: Any, by_format: Any,
                                                 reference: Callable[..., list[int]]) -> None:
    ids = tiny_tokenizer(DIALOGUE, add_special_tokens=False)["input_ids"]
    expected, count = expected_completion(tiny_tokenizer, reference(None, ids, TOKENS),
                                          {tiny_tokenizer.eos_token_id}, [])
    result = client.completions.create(model=str(tiny_model), prompt=DIALOGUE,
                                       max_tokens=TOKENS, temperature=0)
    assert (result.choices[0].text, result.usage.completion_tokens) == (expected, count)


def test_the_server_computes_lora_with_the_grouped_cpu_ops(
        serving: ServingStack, client: openai.OpenAI, tiny_model: Path,
        by_format: dict[str, tuple[str, Path]]) -> None:
    # The outputs above, equal to peft's, came from these ops (test_vllm_cpu_lora.py).
    view = view_after_a_request(serving, client, tiny_model, by_format)
    assert view["lora_ops"] == "grouped"
    assert "Using PunicaWrapperCPUGrouped" in Path(view["log"]).read_text()


def test_the_servers_model_processes_run_at_idle_cpu_priority(
        serving: ServingStack, client: openai.OpenAI, tiny_model: Path,
        by_format: dict[str, tuple[str, Path]]) -> None:
    # What keeps the API responsive while vLLM fills the cores (BENCHMARKS.md, status polls).
    view = view_after_a_request(serving, client, tiny_model, by_format)
    assert view["cpu_scheduling"] == "idle"
    said = re.findall(r"lorafleet: (\w+) \(pid (\d+)\) runs with SCHED_IDLE",
                      Path(view["log"]).read_text())
    names = {process for process, _ in said}
    assert any(n.startswith("EngineCore") for n in names), said
    live = [pid for _, pid in said if Path(f"/proc/{pid}").exists()]  # this server's
    assert live, said
    for pid in live:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                assert os.sched_getscheduler(int(tid)) == os.SCHED_IDLE, (pid, tid)
    # The server's HTTP front end keeps its priority: it answers the engine.
    assert os.sched_getscheduler(view["pid"]) == os.SCHED_OTHER


def test_an_adapter_changed_after_its_probe_is_refused(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path, tmp_path: Path,
) -> None:
    name, folder = add_adapter(serving, tiny_model, 300, FORMATS["dolly"])
    # Other weights under the recorded probe: what peft generates no longer matches it.
    other = build_adapter(tiny_model, tmp_path / "other", 301, prompt_format=FORMATS["dolly"],
                          probe=True)
    probe = json.loads((folder / "lorafleet.json").read_text())["parity_probe"]
    assert json.loads((other / "lorafleet.json").read_text())["parity_probe"]["token_ids"] != (
        probe["token_ids"]), "both weights give the same probe: the test could not tell"
    (folder / "adapter_model.safetensors").write_bytes(
        (other / "adapter_model.safetensors").read_bytes())

    for _ in range(2):  # refused on loading, then at once
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.completions.create(model=name, prompt=DIALOGUE, max_tokens=4)
        assert refused.value.code == "adapter_parity_failed"
        assert refused.value.param == "model"
        message = refused.value.body["message"]
        assert "peft generated" in message and "vLLM generates" in message
        assert str(probe["token_ids"]) in message
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=name, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert serving.engine_stats()["adapters_refused"] >= 1
    # It was unloaded from vLLM: nothing can reach it there.
    served = httpx.get(f"{serving.vllm_url(tiny_model)}/v1/models", timeout=10).json()
    assert all(m["root"] != str(folder) for m in served["data"])


def test_an_adapter_above_the_rank_limit_is_refused_naming_the_setting(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path,
) -> None:
    name, _ = add_adapter(serving, tiny_model, 400, FORMATS["dolly"], r=2 * MAX_LORA_RANK,
                          probe=False)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt=DIALOGUE, max_tokens=4)
    assert refused.value.param == "model"
    assert "LORAFLEET_VLLM_MAX_LORA_RANK" in refused.value.body["message"]
    assert f"rank {2 * MAX_LORA_RANK}" in refused.value.body["message"]
    # The engine goes on serving.
    assert client.completions.create(model=str(tiny_model), prompt="Hi", max_tokens=2).choices


def test_a_new_adapter_is_served_without_a_restart(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path, tiny_tokenizer: Any,
    reference: Callable[..., list[int]],
) -> None:
    client.completions.create(model=str(tiny_model), prompt="Hi", max_tokens=1)
    before = serving.engine_stats()
    pid = vllm_pid(serving, tiny_model)
    name, folder = add_adapter(serving, tiny_model, 500, FORMATS["phi2-qa"])
    prompt = render_prompt(PromptFormat.model_validate(FORMATS["phi2-qa"]), "Say something")
    expected = reference(folder, tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"],
                         8)
    result = client.completions.create(model=name, prompt="Say something", max_tokens=8,
                                       temperature=0)
    text, _ = expected_completion(tiny_tokenizer, expected, {tiny_tokenizer.eos_token_id},
                                  stop_sequences(PromptFormat.model_validate(FORMATS["phi2-qa"])))
    assert result.choices[0].text == text
    after = serving.engine_stats()
    assert after["server_starts"] == before["server_starts"]
    assert vllm_pid(serving, tiny_model) == pid
    loaded = after["base_models"][str(tiny_model)]
    assert loaded["adapter_loads"] == before["base_models"][str(tiny_model)]["adapter_loads"] + 1


def test_streams_are_relayed_as_they_come(client: openai.OpenAI,
                                          by_format: dict[str, tuple[str, Path]]) -> None:
    name, _ = by_format["dolly"]
    whole = client.completions.create(model=name, prompt=[DIALOGUE, "Hello there"], n=2,
                                      max_tokens=TOKENS, temperature=0)
    stream = client.completions.create(model=name, prompt=[DIALOGUE, "Hello there"], n=2,
                                       max_tokens=TOKENS, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    texts = ["", "", "", ""]
    reasons: list[str | None] = [None] * 4
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                assert reasons[choice.index] is None, "two closing chunks for one choice"
                reasons[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n equal choices
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.model == name and c.id == chunks[0].id for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 4


def wait_for(condition: Callable[[], bool], failure: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)


def test_a_client_that_leaves_a_stream_aborts_its_vllm_request(
    serving: ServingStack, tiny_model: Path, by_format: dict[str, tuple[str, Path]],
) -> None:
    # vLLM's engine (its engine-core and worker processes) is paused while the client comes
    # and goes, so the request cannot end before the client leaves, however fast the
    # machine; vLLM's HTTP server, which runs on, sees the gateway drop the request.
    url = serving.vllm_url(tiny_model)
    server = psutil.Process(engine_view(serving, tiny_model)["pid"])
    engine = server.children(recursive=True)
    finished = vllm_metric(url, "request_success_total")
    before = serving.engine_stats()
    body = {"model": str(tiny_model), "prompt": "Once upon a time", "max_tokens": 1000,
            "temperature": 0, "stream": True}
    for process in engine:
        process.suspend()
    try:
        with serving.stack.http().stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200  # vLLM took the request
            assert serving.engine_stats()["busy"]
        wait_for(lambda: serving.engine_stats()["rows_cancelled"] > before["rows_cancelled"],
                 "the engine kept its request to vLLM for a gone client")
    finally:
        for process in engine:
            process.resume()
    # vLLM's engine handles its requests in order: once a later request is answered, the
    # first one ran or was aborted. Aborted, it is neither running nor counted as finished.
    after = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": str(tiny_model), "prompt": "Hi", "max_tokens": 1})
    assert after.status_code == 200
    wait_for(lambda: vllm_metric(url, "num_requests_running") == 0, "vLLM runs on")
    assert vllm_metric(url, "request_success_total") == finished + 1


def test_a_vllm_server_that_dies_answers_503_then_a_new_one_serves(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path,
    by_format: dict[str, tuple[str, Path]],
) -> None:
    name, _ = by_format["dolly"]
    client.completions.create(model=name, prompt="Hi", max_tokens=1)
    server = engine_view(serving, tiny_model)
    os.killpg(server["pid"], signal.SIGKILL)  # the server and its engine-core processes
    deadline = time.monotonic() + 60
    # Dead once all its threads are: the engine can then collect its exit status.
    while engine_view(serving, tiny_model)["exit_code"] is None:
        assert time.monotonic() < deadline, "the vLLM server did not die"
        time.sleep(0.1)

    with pytest.raises(openai.InternalServerError) as unavailable:
        client.completions.create(model=name, prompt="Hi", max_tokens=2)
    assert unavailable.value.status_code == 503
    assert unavailable.value.code == "engine_unavailable"
    assert server["log"] in unavailable.value.body["message"]  # where to look
    # The next request starts a new server, loads the adapter there again and is answered.
    again = client.completions.create(model=name, prompt="Hi", max_tokens=2)
    assert again.choices and again.usage.completion_tokens >= 1
    stats = serving.engine_stats()
    assert stats["base_models"][str(tiny_model)]["pid"] != server["pid"]
    assert stats["base_models"][str(tiny_model)]["adapter_loads"] == 1


def test_a_larger_adapter_is_served_by_a_server_restarted_at_its_rank(
    serving: ServingStack, client: openai.OpenAI, tiny_model: Path, tiny_tokenizer: Any,
    by_format: dict[str, tuple[str, Path]], reference: Callable[..., list[int]],
) -> None:
    """On the CPU a server starts at the rank its adapters need (8 for these), since vLLM's
    CPU LoRA kernels compute at --max-lora-rank. An adapter of rank 16 replaces it with one
    at 16, which serves the earlier adapters too, token for token the same. While the new
    server starts (held paused here, so however fast it would be), the old one goes on serving
    the adapters it covers."""
    small, _ = by_format["dolly"]
    earlier = client.completions.create(model=small, prompt=DIALOGUE, max_tokens=TOKENS,
                                        temperature=0).choices[0].text
    old = engine_view(serving, tiny_model)
    assert old["max_lora_rank"] == 8
    before = serving.engine_stats()

    fmt = PromptFormat.model_validate(FORMATS["phi2-qa"])
    name, folder = add_adapter(serving, tiny_model, 600, FORMATS["phi2-qa"], r=MAX_LORA_RANK)
    expected = reference(folder, tiny_tokenizer(render_prompt(fmt, "Say something"),
                                                add_special_tokens=False)["input_ids"], 8)
    text, _ = expected_completion(tiny_tokenizer, expected, {tiny_tokenizer.eos_token_id},
                                  stop_sequences(fmt))
    engine = psutil.Process(serving.engine.pid)
    with ThreadPoolExecutor(1) as pool:
        larger = pool.submit(client.completions.create, model=name, prompt="Say something",
                             max_tokens=8, temperature=0)
        wait_for(lambda: serving.engine_stats()["server_starts"] > before["server_starts"],
                 "no server was started for the larger adapter", timeout=120)
        [starting] = [p for p in engine.children() if p.pid != old["pid"]
                      and "vllm.entrypoints.openai.api_server" in p.cmdline()]
        starting.suspend()
        try:
            during = client.completions.create(model=small, prompt=DIALOGUE,
                                               max_tokens=TOKENS, temperature=0)
            assert during.choices[0].text == earlier
            assert engine_view(serving, tiny_model)["pid"] == old["pid"]
            assert not larger.done()
        finally:
            starting.resume()
        result = larger.result(timeout=600)
    assert result.choices[0].text == text
    new = engine_view(serving, tiny_model)
    assert new["max_lora_rank"] == MAX_LORA_RANK and new["pid"] == starting.pid
    assert serving.engine_stats()["rank_restarts"] == before["rank_restarts"] + 1

    def stopped() -> bool:
        try:
            return psutil.Process(old["pid"]).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(stopped, "the server at rank 8 was left running")
    assert client.completions.create(model=small, prompt=DIALOGUE, max_tokens=TOKENS,
                                     temperature=0).choices[0].text == earlier
