"""OpenAI's chat training files as users bring them, through the official openai SDK against a
real API, Celery worker and inference engine on Redis and PostgreSQL: a function-calling file,
a multi-turn chat answering a call with a tool message, a multi-turn chat with ``weight: 0``.
Each is accepted as ``record_format: "chat"``, trains without a ``prompt_format`` (the chat
template; tools rendered by a template that renders them, else in the Hermes format), and gives
an adapter that loads with ``PeftModel.from_pretrained`` and is served; each bad input is
answered 400 naming the line and the field."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.engine.conftest import ServingStack
from tests.support import REDIS_POSTGRES, jsonl_bytes, upload_bytes, wait_for_status
from tests.support.openai_chats import (
    DRONE_TOOLS,
    MULTI_TURN,
    PLAIN_CHATML,
    drone_records,
    with_chat_template,
)

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.postgres]
torch = pytest.importorskip("torch")

SERVING_SETTINGS = {"engine_backend": "builtin"}  # the adapter's service, not vLLM, is tested
SERVING_BACKEND = REDIS_POSTGRES
# Two of the cookbook's tools keep a record within the tiny model's 1024 positions.
SHORT_TOOLS = [t for t in DRONE_TOOLS if t["function"]["name"] in ("set_drone_lighting",
                                                                     "reject_request")]
TRAINING = {"max_steps": 4, "save_steps": 4, "logging_steps": 1, "max_length": 1024,
            "batch_size": 2, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}}


def multi_turn_with_weights() -> dict[str, Any]:
    """A chat of three turns without tools; the middle answer is not learned."""
    return {"messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Tell me a long story"},
        {"role": "assistant", "content": "Once upon a time, a bad answer.", "weight": 0},
        {"role": "user", "content": "Shorter, please"},
        {"role": "assistant", "content": "The end."}]}


FILES = {
    "function calling": drone_records(8, tools=SHORT_TOOLS),
    "tool messages": [MULTI_TURN] * 8,
    "weight 0": [multi_turn_with_weights()] * 8,
}
# (file, base model): the tiny model's template renders tools itself; its plain-ChatML copy
# does not, so its chats are rendered in the Hermes format.
RUNS = {
    "function calling": ("function calling", "tiny"),
    "function calling, Hermes format": ("function calling", "plain"),
    "tool messages": ("tool messages", "tiny"),
    "tool messages, Hermes format": ("tool messages", "plain"),
    "weight 0": ("weight 0", "tiny"),
}
TOOL_FORMATS = {"tiny": "template", "plain": "hermes"}


@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai()


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base models, under the operator's models folder (pytest's base folder)."""
    plain = with_chat_template(tiny_model, tmp_path_factory.mktemp("plain-chatml") / "model",
                               PLAIN_CHATML)
    return {"tiny": tiny_model, "plain": plain}


@pytest.fixture(scope="module")
def trained(client: openai.OpenAI, models: dict[str, Path]) -> dict[str, Any]:
    """One job per run, all queued at once: {run: (file, finished job)}."""
    uploads = {name: upload_bytes(client, jsonl_bytes(records), f"{name}.jsonl")
               for name, records in FILES.items()}
    started = {}
    for run, (name, model) in RUNS.items():
        job = client.fine_tuning.jobs.create(model=str(models[model]),
                                             training_file=uploads[name].id, seed=7,
                                             extra_body=TRAINING)
        started[run] = (uploads[name], job)
    return {run: (upload, wait_for_status(client, job.id, "succeeded", timeout=900))
            for run, (upload, job) in started.items()}


@pytest.mark.parametrize("run", list(RUNS))
def test_an_openai_chat_file_trains_and_is_served(client: openai.OpenAI, trained: dict[str, Any],
                                                  models: dict[str, Path], run: str,
                                                  serving: ServingStack) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    upload, job = trained[run]
    model = RUNS[run][1]
    assert (upload.model_extra["record_format"], upload.model_extra["line_count"]) == ("chat", 8)
    assert job.model_extra["prompt_format"]["type"] == "chat"  # none was sent
    assert job.model_extra["dataset"]["examples"] == 8
    adapter = serving.stack.local_folder(job.model_extra["adapter_path"])  # on S3 here
    meta = json.loads((adapter / "lorafleet.json").read_text())
    assert meta["tool_format"] == TOOL_FORMATS[model]  # as the probe found the template
    assert meta["prompt_format"]["type"] == "chat"

    base = AutoModelForCausalLM.from_pretrained(models[model])
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    assert not torch.allclose(before, after)

    reply = client.chat.completions.create(
        model=job.fine_tuned_model, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert reply.model == job.fine_tuned_model
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens > 0


def test_a_one_turn_format_on_a_tool_file_fails_naming_prompt_format(
        client: openai.OpenAI, tiny_model: Path) -> None:
    upload = upload_bytes(client, jsonl_bytes(FILES["function calling"]), "tools.jsonl")

    job = client.fine_tuning.jobs.create(model=str(tiny_model), training_file=upload.id,
                                         extra_body={**TRAINING, "prompt_format": "dolly"})

    failed = wait_for_status(client, job.id, "failed", timeout=120)
    assert failed.error.param == "prompt_format"
    assert failed.error.message == (
        "training_file line 1: prompt_format 'dolly' learns the last assistant message only, "
        "and this chat uses tools: train it with prompt_format 'chat' (the default for chat "
        "files)")


def bad(*changes: tuple[list[Any], Any]) -> dict[str, Any]:
    """:data:`MULTI_TURN` with each ``(path, value)`` set (``...``: removed)."""
    record = copy.deepcopy(MULTI_TURN)
    for path, value in changes:
        node = record
        for key in path[:-1]:
            node = node[key]
        if value is ...:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return record


@pytest.mark.parametrize(("record", "says"), [
    (bad((["messages", 2, "tool_calls", 0, "function", "arguments"], "{city: Paris}")),
     "line 3: messages[2].tool_calls[0].function.arguments is not valid JSON"),
    (bad((["messages", 3, "tool_call_id"], "call_7")),
     "line 3: messages[3].tool_call_id 'call_7' matches no earlier tool call"),
    (bad((["messages", 4, "weight"], 0.5)), "line 3: messages[4].weight must be 0 or 1"),
    (bad((["messages", 2, "tool_calls"], ...)),
     "line 3: messages[2] has neither content nor tool_calls"),
    (bad((["messages", 2, "weight"], 0), (["messages", 6, "weight"], 0)),
     "line 3: messages: no assistant message is learned (each has weight 0)"),
    (bad((["messages", 1, "role"], "robot")),
     "line 3: messages[1].role must be one of system, developer, user, assistant, tool"),
])
def test_a_bad_chat_is_answered_400_naming_line_and_field(client: openai.OpenAI,
                                                          record: dict[str, Any],
                                                          says: str) -> None:
    content = jsonl_bytes([MULTI_TURN, MULTI_TURN, record])

    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("chat.jsonl", io.BytesIO(content)), purpose="fine-tune")

    assert refused.value.status_code == 400
    assert refused.value.body["message"] == says
    assert refused.value.param == "file"
