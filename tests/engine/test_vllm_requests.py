"""What evaluation and agent clients send, through the API to the engine on vLLM, against
fine-tuned models: logprobs and echo equal to what transformers + peft compute (completions
with text and token-id prompts, chat), JSON answers that validate against their schema, tool
calls through the openai SDK (its parse and streaming helpers) and LangChain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.engine.conftest import ServingStack, vllm_available
from tests.engine.parity import assert_chat_parity, assert_completion_parity
from tests.engine.test_vllm import add_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not vllm_available() and not os.environ.get("CI"),
    reason="no .venv-vllm (`make venv-vllm`; make test creates it where vLLM installs)")]

SERVING_SETTINGS = {"engine_backend": "vllm", "vllm_max_lora_rank": 16}
SERVING_WORKERS = 0  # the adapters are built by the tests, no job trains

DIALOGUE = "#Person1#: Hi, how are you today?\n#Person2#: Fine, thanks. And you?"
DOLLY = {"type": "dolly", "instruction": "Summarize the below conversation."}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


class Summary(BaseModel):
    # Bounded, so that a random model's answer ends within max_tokens: the grammar makes the
    # answer valid as far as it goes, only a bound makes it end.
    topic: str = Field(max_length=16)
    people: int = Field(ge=1, le=9)


@pytest.fixture(scope="module")
def client(serving: ServingStack) -> openai.OpenAI:
    return serving.stack.openai(timeout=600)


@pytest.fixture(scope="module")
def summarizer(serving: ServingStack, tiny_model: Path) -> tuple[str, Path]:
    """A fine-tuned model trained with the dolly format (its prompts are wrapped)."""
    return add_adapter(serving, tiny_model, 300, DOLLY)


@pytest.fixture(scope="module")
def chatter(serving: ServingStack, tiny_model: Path) -> tuple[str, Path]:
    """A fine-tuned model trained with the chat format."""
    return add_adapter(serving, tiny_model, 301, {"type": "chat"})


@pytest.fixture(scope="module")
def hermes_chatter(serving: ServingStack, tiny_model: Path) -> tuple[str, Path]:
    """A fine-tuned chat model whose adapter learned tools in the Hermes format (as training
    stores it for a template that renders none, SmolLM2's): its ``lorafleet.json`` decides how
    the engine shows tools, over the base template's own way."""
    name, folder = add_adapter(serving, tiny_model, 302, {"type": "chat"})
    meta = json.loads((folder / "lorafleet.json").read_text())
    (folder / "lorafleet.json").write_text(json.dumps({**meta, "tool_format": "hermes"}))
    return name, folder


@pytest.fixture(scope="module")
def text(tiny_model: Path) -> Any:
    from modelio.model_text import ModelText

    return ModelText(str(tiny_model))


def test_echo_scores_a_prompt_as_peft_does(client: openai.OpenAI, summarizer: tuple[str, Path],
                                           text: Any, reference_logprobs: Any) -> None:
    name, adapter = summarizer
    ids = text.encode(DIALOGUE)
    result = client.completions.create(model=name, prompt=DIALOGUE, max_tokens=0, echo=True,
                                       logprobs=3, temperature=0)
    choice = result.choices[0]
    assert choice.text == DIALOGUE and result.usage.completion_tokens == 0
    assert result.usage.prompt_tokens == len(ids) == len(choice.logprobs.tokens)
    assert_completion_parity(choice.logprobs.model_dump(), ids,
                             lambda i: reference_logprobs(adapter, i), k=3)


def test_token_prompts_scored_as_lm_eval_asks(client: openai.OpenAI,
                                              summarizer: tuple[str, Path], text: Any,
                                              reference_logprobs: Any) -> None:
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, one token generated."""
    name, adapter = summarizer
    prompts = [text.encode(DIALOGUE), text.encode("Hello there, friend")]
    result = client.completions.create(model=name, prompt=prompts, max_tokens=1, echo=True,
                                       logprobs=1, temperature=0, seed=1234)
    assert len(result.choices) == 2
    for ids, choice in zip(prompts, sorted(result.choices, key=lambda c: c.index), strict=True):
        logprobs = choice.logprobs.model_dump()
        cut = {k: v[:len(ids)] for k, v in logprobs.items()}
        assert_completion_parity(cut, ids, lambda i: reference_logprobs(adapter, i), k=1)
        assert len(logprobs["tokens"]) == len(ids) + 1  # and the token generated


def test_generated_tokens_logprobs(client: openai.OpenAI, summarizer: tuple[str, Path],
                                   text: Any, reference: Any, reference_logprobs: Any) -> None:
    name, adapter = summarizer
    ids = text.encode(DIALOGUE)
    result = client.completions.create(model=name, prompt=DIALOGUE, max_tokens=6, echo=True,
                                       logprobs=2, temperature=0, extra_body={"raw_prompt": True})
    generated = reference(adapter, ids, 6)
    logprobs = result.choices[0].logprobs.model_dump()
    assert len(logprobs["tokens"]) >= len(ids) + 1
    got = len(logprobs["tokens"]) - len(ids)
    assert_completion_parity(logprobs, ids + generated[:got],
                             lambda i: reference_logprobs(adapter, i), k=2)
    # Streamed, the same tokens come with their logprobs chunk by chunk.
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=name, prompt=DIALOGUE, max_tokens=6, logprobs=2, temperature=0, stream=True,
        extra_body={"raw_prompt": True}) if c.choices and c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs["tokens"][len(ids):]


def test_chat_logprobs(client: openai.OpenAI, chatter: tuple[str, Path], text: Any,
                       reference: Any, reference_logprobs: Any) -> None:
    name, adapter = chatter
    result = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": DIALOGUE}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=2)
    prompt_ids = text.encode(text.render_chat([{"role": "user", "content": DIALOGUE}], True))
    content = result.choices[0].logprobs.content
    reply = reference(adapter, prompt_ids, 6)[:len(content)]
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert_chat_parity(result.choices[0].logprobs.model_dump(), prompt_ids, reply,
                       lambda i: reference_logprobs(adapter, i), k=2)


def test_json_schema_answers_validate(client: openai.OpenAI, chatter: tuple[str, Path]) -> None:
    name, _ = chatter
    for seed in range(3):  # sampled: different answers, every one valid
        result = client.chat.completions.parse(
            model=name, messages=[{"role": "user", "content": DIALOGUE}],
            response_format=Summary, max_tokens=200, seed=seed, temperature=1)
        assert isinstance(result.choices[0].message.parsed, Summary), result
    loose = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": DIALOGUE}], max_tokens=200,
        response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


def _check_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    return dict(arguments)


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_a_forced_tool_choice_is_a_valid_call(client: openai.OpenAI, chatter: tuple[str, Path],
                                              choice: Any) -> None:
    name, _ = chatter
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    result = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                            tool_choice=choice, max_tokens=60, temperature=0)
    out = result.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    arguments = _check_call(out.message.tool_calls[0])
    # The call and its result go back into the history; auto may answer in text.
    messages += [out.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": out.message.tool_calls[0].id,
                  "content": json.dumps({"city": arguments["city"], "temperature": 21})}]
    after = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                           max_tokens=8, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_sdk_stream_helper_gets_tool_call_deltas(client: openai.OpenAI,
                                                     chatter: tuple[str, Path]) -> None:
    name, _ = chatter
    with client.chat.completions.stream(
            model=name, messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[openai.pydantic_function_tool(Weather)], tool_choice="required",
            max_tokens=60, temperature=0) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    call = final.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Weather)
    assert final.choices[0].finish_reason == "tool_calls"


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["celsius", "fahrenheit"]


def test_langchain_binds_tools_and_structures_output(serving: ServingStack,
                                                     chatter: tuple[str, Path]) -> None:
    from langchain_openai import ChatOpenAI

    name, _ = chatter
    llm = ChatOpenAI(model=name, base_url=f"{serving.stack.base_url}/v1",
                     api_key=serving.stack.key, temperature=0, max_tokens=120, timeout=600)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}
    structured = llm.with_structured_output(Summary, method="json_schema").invoke(DIALOGUE)
    assert isinstance(structured, Summary)


def test_a_hermes_adapter_gets_tools_as_it_learned_them(
        serving: ServingStack, client: openai.OpenAI, hermes_chatter: tuple[str, Path],
        text: Any) -> None:
    from langchain_openai import ChatOpenAI

    from shared.chat import check_messages, check_tools

    name, _ = hermes_chatter
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]

    result = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER],
                                            tool_choice="required", max_tokens=60,
                                            temperature=0)

    out = result.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    _check_call(out.message.tool_calls[0])
    # The prompt was the Hermes rendering (the <tools> block in a system turn), the forced
    # call's opening tag after it: not what the base template renders.
    hermes = text.render_chat(check_messages(messages), True, check_tools([WEATHER]),
                              tool_format="hermes") + "<tool_call>\n"
    template = text.render_chat(check_messages(messages), True, check_tools([WEATHER]),
                                tool_format="template") + "<tool_call>\n"
    assert len(text.encode(hermes)) != len(text.encode(template))
    assert result.usage.prompt_tokens == len(text.encode(hermes))

    llm = ChatOpenAI(model=name, base_url=f"{serving.stack.base_url}/v1",
                     api_key=serving.stack.key, temperature=0, max_tokens=120, timeout=600)
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Rome?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}


def test_refused_fields_are_named(client: openai.OpenAI, summarizer: tuple[str, Path]) -> None:
    name, _ = summarizer
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt="x", suffix="y")
    assert refused.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model=name, prompt="x", extra_body={"top_k": 3})
    assert unknown.value.body["code"] == "unknown_parameter"


# --------------------------------------------------------------------------- lm-eval
def _lm_eval_tasks(folder: Path) -> Path:
    """A multiple-choice task (which summary belongs to the dialogue) and a generate_until task
    (summarize), from the bundled DialogSum sample."""
    from shared.samples import SAMPLE_PATH

    records = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()][:8]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "mc.jsonl").open("w") as out:
        for i, r in enumerate(records):
            choices = [records[(i + j) % len(records)]["summary"] for j in range(3)]
            out.write(json.dumps({"context": f"Dialogue:\n{r['dialogue']}\nSummary:",
                                  "choices": choices, "gold": 0}) + "\n")
    with (folder / "gen.jsonl").open("w") as out:
        for r in records[:4]:
            out.write(json.dumps({"dialogue": r["dialogue"], "summary": r["summary"]}) + "\n")
    (folder / "mc.yaml").write_text(
        "task: lorafleet_dialogsum_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: lorafleet_dialogsum_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{dialogue}}'\n"
        "doc_to_target: '{{summary}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: bleu\n")
    return folder


def _lm_eval(args: list[str], out: Path, env: dict[str, str]) -> dict[str, list[Any]]:
    """Run lm-eval's command line; each task's per-document responses."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(out),
                          "--log_samples"], env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    responses: dict[str, list[Any]] = {}
    for samples in out.rglob("samples_*.jsonl"):
        task = samples.name.removeprefix("samples_").rsplit("_", 1)[0]
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()),
                      key=lambda d: d["doc_id"])
        responses[task] = [d["resps"] for d in docs]
    return responses


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_scores_through_the_api_as_its_hf_backend(
        serving: ServingStack, summarizer: tuple[str, Path], tiny_model: Path,
        tmp_path: Path, tokenized: bool) -> None:
    """lm-evaluation-harness's local-completions against a fine-tuned model: the same
    per-choice loglikelihoods (so the same accuracy) as its own hf backend with the adapter;
    its generate_until task runs through the API too."""
    pytest.importorskip("lm_eval")
    from tests.support.processes import service_env

    name, adapter = summarizer
    tasks = _lm_eval_tasks(tmp_path / "tasks")
    env = service_env({"OPENAI_API_KEY": serving.stack.key, "HF_DATASETS_OFFLINE": "1",
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    common = ["--include_path", str(tasks), "--seed", "0"]
    api = _lm_eval(["--model", "local-completions", "--model_args",
                    f"model={name},base_url={serving.stack.base_url}/v1/completions,"
                    f"tokenizer={tiny_model},tokenized_requests={tokenized},max_retries=1",
                    "--tasks", "lorafleet_dialogsum_mc,lorafleet_dialogsum_gen", *common],
                   tmp_path / "api", env)
    hf = _lm_eval(["--model", "hf", "--model_args",
                   f"pretrained={tiny_model},peft={adapter},dtype=float32", "--device", "cpu",
                   "--tasks", "lorafleet_dialogsum_mc", *common], tmp_path / "hf", env)
    served = [[float(c[0][0]) for c in doc] for doc in api["lorafleet_dialogsum_mc"]]
    local = [[float(c[0][0]) for c in doc] for doc in hf["lorafleet_dialogsum_mc"]]
    assert len(served) == len(local) == 8
    for a, b in zip(served, local, strict=True):
        assert all(abs(x - y) < 1e-3 for x, y in zip(a, b, strict=True)), (a, b)
        assert max(range(3), key=a.__getitem__) == max(range(3), key=b.__getitem__)
    generated = api["lorafleet_dialogsum_gen"]
    assert len(generated) == 4 and all(isinstance(d[0][0], str) for d in generated)
