"""DPO requests through the official SDK: preference files in OpenAI's format are recognised
on upload and bad lines named; ``method`` goes in as the SDK sends it and comes back with what
each ``"auto"`` resolved to; a method and a file that do not fit each other are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import Stack, jsonl_bytes, upload_bytes, upload_dialogsum
from tests.support.preference import OPENAI_EXAMPLE, preference_pairs


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    return stack.http()


@pytest.fixture(scope="module")
def pairs_file(client: openai.OpenAI) -> Any:
    return upload_bytes(client, jsonl_bytes([OPENAI_EXAMPLE, *preference_pairs(7)]),
                        "pairs.jsonl")


@pytest.fixture(scope="module")
def chat_file(client: openai.OpenAI) -> Any:
    chat = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    return upload_bytes(client, jsonl_bytes([chat] * 4), "chat.jsonl")


def create(client: openai.OpenAI, model: Path, training_file: str, **fields: Any) -> Any:
    """Create a job and cancel it at once: these tests read what creation answers, and the
    stack's worker is left free for the other modules' jobs."""
    own = {k: fields.pop(k) for k in ("method", "validation_file", "hyperparameters")
           if k in fields}
    job = client.fine_tuning.jobs.create(model=str(model), training_file=training_file,
                                         extra_body={"max_steps": 1000, **fields}, **own)
    client.fine_tuning.jobs.cancel(job.id)
    return job


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# --------------------------------------------------------------------------- files
def test_a_preference_file_is_uploaded_as_preference(pairs_file: Any,
                                                     client: openai.OpenAI) -> None:
    assert pairs_file.status == "processed"
    assert pairs_file.line_count == 8
    assert pairs_file.record_format == "preference"
    assert client.files.retrieve(pairs_file.id).record_format == "preference"


def bad(line: int, path: str, value: Any) -> bytes:
    """A preference file whose ``line`` has ``value`` at ``path`` (``...``: deleted)."""
    records = [copy.deepcopy(OPENAI_EXAMPLE) for _ in range(3)]
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = records[line - 1]
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return jsonl_bytes(records)


@pytest.mark.parametrize(("content", "message"), [
    (bad(2, "preferred_output.0.content", 5), "line 2: preferred_output[0].content must be a "
                                              "string"),
    (bad(3, "non_preferred_output", ...), "line 3: missing column 'non_preferred_output'"),
    (bad(1, "non_preferred_output", ...), "line 1: missing column 'non_preferred_output'"),
    (bad(2, "preferred_output.0.role", "user"), "line 2: preferred_output[0].role must be "
                                                "'assistant'"),
    (bad(2, "non_preferred_output", []), "line 2: non_preferred_output must be a list of "
                                         "one assistant message"),
    (bad(3, "input.messages.0.role", "assistant"), "line 3: input.messages[0] is the "
                                                   "assistant's"),
    (bad(2, "input.messages.0.role", "robot"), "line 2: input.messages[0].role must be one of"),
    (bad(2, "input.messages", "hello"), "line 2: 'input.messages' must be a non-empty list"),
    (bad(2, "input", ["x"]), "line 2: 'input' must be an object with 'messages'"),
    (bad(2, "input.tools", [{"type": "function"}]), "line 2: input.tools[0].function must be "
                                                    "an object"),
    (bad(2, "input.parallel_tool_calls", 1), "line 2: 'input.parallel_tool_calls' must be "
                                             "true or false"),
])
def test_a_bad_preference_line_is_400_naming_line_and_field(http: httpx.Client, content: bytes,
                                                            message: str) -> None:
    error = error_of(upload_bytes(http, content), 400)

    assert error["message"].startswith(message)
    assert error["param"] == "file"
    assert error["code"] == "invalid_file"


# --------------------------------------------------------------------------- method
def test_dpo_method_round_trip_through_the_sdk(client: openai.OpenAI, pairs_file: Any,
                                               tiny_model: Path) -> None:
    given = {"beta": 0.25, "batch_size": 2, "learning_rate_multiplier": 0.5, "n_epochs": 3}

    job = create(client, tiny_model, pairs_file.id, method={"type": "dpo", "dpo": {
        "hyperparameters": given}}, max_steps=None)
    again = client.fine_tuning.jobs.retrieve(job.id)

    for answer in (job, again):
        assert answer.method.type == "dpo"
        assert answer.method.dpo.hyperparameters.model_dump() == given
        assert answer.method.supervised is None
        assert answer.model_extra["loss_type"] == "sigmoid"
        assert answer.model_extra["rpo_alpha"] is None
        assert answer.model_extra["learning_rate"] == pytest.approx(5e-5)
        assert answer.hyperparameters.batch_size == 2
        # No format was sent: the pairs' chats render with the chat template.
        assert answer.model_extra["prompt_format"]["type"] == "chat"


def test_auto_dpo_hyperparameters_resolve(client: openai.OpenAI, pairs_file: Any,
                                          tiny_model: Path) -> None:
    job = create(client, tiny_model, pairs_file.id, max_steps=None, method={
        "type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "batch_size": "auto",
                                                   "learning_rate_multiplier": "auto",
                                                   "n_epochs": "auto"}}})

    assert job.method.dpo.hyperparameters.model_dump() == {
        "beta": 0.1, "batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 1}


def test_dpo_extensions_are_echoed(client: openai.OpenAI, pairs_file: Any,
                                   tiny_model: Path) -> None:
    job = create(client, tiny_model, pairs_file.id, method={"type": "dpo"}, loss_type="ipo",
                 rpo_alpha=0.5)

    assert (job.model_extra["loss_type"], job.model_extra["rpo_alpha"]) == ("ipo", 0.5)
    assert job.method.dpo.hyperparameters.beta == 0.1


def test_a_supervised_job_echoes_its_resolved_method(client: openai.OpenAI, tiny_model: Path,
                                                     ) -> None:
    file = upload_dialogsum(client, 4)
    job = create(client, tiny_model, file.id, max_steps=None, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2,
                                                                 "batch_size": "auto"}}})

    assert job.method.type == "supervised"
    assert job.method.supervised.hyperparameters.model_dump() == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert job.model_extra["loss_type"] is None


# --------------------------------------------------------------------------- refusals
def post_job(http: httpx.Client, model: Path, training_file: str, **fields: Any) -> Any:
    return http.post("/v1/fine_tuning/jobs", json={"model": str(model),
                                                   "training_file": training_file, **fields})


def test_dpo_on_a_chat_file_is_refused_naming_training_file(
        http: httpx.Client, chat_file: Any, tiny_model: Path) -> None:
    error = error_of(post_job(http, tiny_model, chat_file.id, method={"type": "dpo"}), 400)

    assert error["param"] == "training_file"
    assert error["message"].startswith(f"training_file: file {chat_file.id} holds chat "
                                       "records; a dpo job trains on preference records")
    assert '"preferred_output"' in error["message"]


def test_supervised_on_a_preference_file_is_refused_naming_method(
        http: httpx.Client, pairs_file: Any, tiny_model: Path) -> None:
    for method in (None, {"type": "supervised"}):
        fields = {"method": method} if method else {}
        error = error_of(post_job(http, tiny_model, pairs_file.id, **fields), 400)

        assert error["param"] == "method"
        assert error["message"] == (
            f"training_file: file {pairs_file.id} holds preference records, which a "
            'supervised job cannot learn from: train on it with method {"type": "dpo"}')


def test_a_validation_file_must_fit_the_method_too(http: httpx.Client, pairs_file: Any,
                                                   chat_file: Any, tiny_model: Path) -> None:
    error = error_of(post_job(http, tiny_model, pairs_file.id, method={"type": "dpo"},
                              validation_file=chat_file.id), 400)

    assert error["param"] == "validation_file"


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"loss_type": "ipo"}, "loss_type", "loss_type applies to dpo jobs only"),
    ({"rpo_alpha": 1.0}, "rpo_alpha", "rpo_alpha applies to dpo jobs only"),
])
def test_dpo_options_on_a_supervised_job_are_refused(http: httpx.Client, tiny_model: Path,
                                                     client: openai.OpenAI, fields: dict,
                                                     param: str, says: str) -> None:
    file = upload_dialogsum(client, 2)
    error = error_of(post_job(http, tiny_model, file.id, **fields), 400)

    assert (error["param"], error["message"].startswith(says)) == (param, True)


@pytest.mark.parametrize(("fields", "param"), [
    ({"column_map": {"input": "question"}}, "column_map"),
    ({"max_tokens_per_batch": 2048}, "max_tokens_per_batch"),
    ({"train_on_inputs": True}, "train_on_inputs"),
    ({"packing": True}, "packing"),
    ({"prompt_format": {"type": "custom", "prompt_template": "{input}",
                        "response_template": "{output}"}}, "prompt_format"),
])
def test_supervised_only_options_on_a_dpo_job_are_refused(
        http: httpx.Client, pairs_file: Any, tiny_model: Path, fields: dict, param: str) -> None:
    error = error_of(post_job(http, tiny_model, pairs_file.id, method={"type": "dpo"},
                              **fields), 400)

    assert error["param"] == param


@pytest.mark.parametrize(("method", "param"), [
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "supervised": {}}, "method"),
    ({"type": "reinforcement"}, "method.type"),
])
def test_bad_method_is_422_naming_it(http: httpx.Client, pairs_file: Any, tiny_model: Path,
                                     method: dict, param: str) -> None:
    error = error_of(post_job(http, tiny_model, pairs_file.id, method=method), 422)

    assert error["param"] == param


def test_an_unknown_loss_type_is_422(http: httpx.Client, pairs_file: Any,
                                     tiny_model: Path) -> None:
    error = error_of(post_job(http, tiny_model, pairs_file.id, method={"type": "dpo"},
                              loss_type="kto"), 422)

    assert error["param"] == "loss_type"

