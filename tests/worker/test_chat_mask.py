"""The loss mask of chats in OpenAI's whole shape, computed by hand and compared token for
token: every learned assistant message (its tool calls included) is learned; system, user and
tool tokens are not."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("datasets")

from modelio.loading import load_tokenizer  # noqa: E402
from shared.templates import PromptFormat  # noqa: E402
from tests.support.jobs import jsonl_bytes  # noqa: E402
from tests.support.openai_chats import MULTI_TURN, PLAIN_CHATML, QWEN25_TEMPLATE  # noqa: E402
from tests.worker.test_preprocess import spec  # noqa: E402
from worker.preprocess import IGNORE_INDEX, prepare  # noqa: E402

CHAT = PromptFormat(type="chat")

# MULTI_TURN, written out by hand as both templates render it: plain ChatML with the tools in
# the Hermes format, and Qwen2.5's template, which renders the tools itself the same way.
# (text, learned) in order.
WEATHER_SPEC = ('{"type": "function", "function": {"name": "get_weather", "description": '
                '"The weather in a city now.", "parameters": {"type": "object", "properties": '
                '{"city": {"type": "string"}}, "required": ["city"]}}}')
BY_HAND = [
    ("<|im_start|>system\nAnswer briefly.\n\n# Tools\n\nYou may call one or more functions to "
     "assist with the user query.\n\nYou are provided with function signatures within "
     f"<tools></tools> XML tags:\n<tools>\n{WEATHER_SPEC}\n</tools>\n\nFor each function call, "
     "return a json object with function name and arguments within <tool_call></tool_call> "
     'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
     "</tool_call><|im_end|>\n"
     "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n",
     False),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
     "<|im_end|>\n", True),
    ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n"
     "<|im_start|>assistant\nSunny, 18 C.<|im_end|>\n"  # weight 0: context
     "<|im_start|>user\nAnd should I take a coat?<|im_end|>\n<|im_start|>assistant\n", False),
    ("No coat needed.<|im_end|>\n", True),
]


def with_template(tiny_model: Path, template: str) -> Any:
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_model: Path) -> Any:
    """The tiny tokenizer with Qwen2.5's chat template, which renders tools."""
    return with_template(tiny_model, QWEN25_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model: Path) -> Any:
    """The tiny tokenizer with a ChatML template that renders no tools."""
    return with_template(tiny_model, PLAIN_CHATML)


def prepared(tmp_path: Path, tokenizer: Any, *records: dict[str, Any], **overrides: Any) -> Any:
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl_bytes(records))
    digest = hashlib.sha256(path.read_bytes() + json.dumps(overrides).encode()).hexdigest()
    return prepare(spec(prompt_format=CHAT, **overrides), tokenizer, path, digest)


def by_hand(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Input ids and labels of ``pieces``: each tokenized alone, then the EOS, learned with
    the last piece."""
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id if pieces[-1][1] else IGNORE_INDEX)
    return ids, labels


@pytest.mark.parametrize(("which", "tool_format"), [("plain", "hermes"), ("qwen", "template")])
def test_the_mask_of_a_multi_turn_chat_with_tools(
        settings_env: Callable[..., Any], tmp_path: Path, plain_tokenizer: Any,
        qwen_tokenizer: Any, which: str, tool_format: str) -> None:
    settings_env()
    tokenizer = plain_tokenizer if which == "plain" else qwen_tokenizer

    data = prepared(tmp_path, tokenizer, MULTI_TURN)

    ids, labels = by_hand(tokenizer, BY_HAND)
    assert data.tool_format == tool_format
    assert data.train["input_ids"][0] == ids
    assert data.train["labels"][0] == labels
    learned = [t for t in data.train["labels"][0] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == BY_HAND[1][0] + BY_HAND[3][0] + "<|endoftext|>"


def test_train_on_inputs_learns_every_token(settings_env: Callable[..., Any], tmp_path: Path,
                                            plain_tokenizer: Any) -> None:
    settings_env()

    data = prepared(tmp_path, plain_tokenizer, MULTI_TURN, train_on_inputs=True)

    assert data.train["labels"][0] == data.train["input_ids"][0] == by_hand(plain_tokenizer,
                                                                            BY_HAND)[0]


def test_a_last_message_of_weight_0_is_context(settings_env: Callable[..., Any],
                                               tmp_path: Path, plain_tokenizer: Any) -> None:
    settings_env()
    record = json.loads(json.dumps(MULTI_TURN))
    record["messages"][-1]["weight"] = 0

    data = prepared(tmp_path, plain_tokenizer, record)

    ids, labels = by_hand(plain_tokenizer, [*BY_HAND[:3], (BY_HAND[3][0], False)])
    assert (data.train["input_ids"][0], data.train["labels"][0]) == (ids, labels)


def test_a_single_turn_chat_keeps_its_layout(settings_env: Callable[..., Any], tmp_path: Path,
                                             tiny_tokenizer: Any) -> None:
    settings_env()
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]}

    data = prepared(tmp_path, tiny_tokenizer, record)

    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids, labels = by_hand(tiny_tokenizer, [(prompt, False), ("Hello.<|im_end|>\n", True)])
    assert (data.train["input_ids"][0], data.train["labels"][0]) == (ids, labels)


def test_records_stay_apart_in_a_packed_batch(settings_env: Callable[..., Any], tmp_path: Path,
                                              plain_tokenizer: Any) -> None:
    from worker.collate import PackedCollator

    settings_env()
    data = prepared(tmp_path, plain_tokenizer, MULTI_TURN, MULTI_TURN)
    rows = [data.train[0], data.train[1]]

    batch = PackedCollator()(rows)

    n = len(rows[0]["input_ids"])
    assert batch["sample_bounds"].cuts == (0, n, 2 * n)
    assert batch["position_ids"][0].tolist() == [*range(n), *range(n)]
    labels = batch["labels"][0].tolist()
    assert labels[n] == IGNORE_INDEX  # the first token of a record is never a target
    assert labels[n + 1:] == rows[1]["labels"][1:]
