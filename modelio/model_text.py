"""A base model's text side: its tokenizer and config, and what prompts need from them.

Both engines render and tokenize prompts with it (``engine.prompts``): the built-in
engine adds the weights on top (:class:`~engine.builtin.BaseModelHost`), the vLLM
gateway never loads them, vLLM does.
"""

from __future__ import annotations

import threading
from typing import Any, cast

from transformers import AutoConfig, GenerationConfig

from modelio import chat_template
from modelio.loading import ModelLoadError, load_tokenizer
from shared.errors import LorafleetError
from shared.hermes import ToolFormat

DEFAULT_CONTEXT = 2048
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                   "seq_length", "n_ctx")


def context_length(config: Any, tokenizer: Any) -> int:
    """The longest sequence (prompt + completion) the model takes."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _CONTEXT_FIELDS:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return DEFAULT_CONTEXT


class ModelText:
    """The tokenizer and config of base model ``name`` (cheap to load, any thread).

    Args:
        name: a hub id or a local folder.
        max_context: cap the context length at this (a server configured for less).

    Raises:
        ModelLoadError: the tokenizer or config of ``name`` does not load.
    """

    def __init__(self, name: str, max_context: int | None = None):
        self.name = name
        self.tokenizer = load_tokenizer(name)
        try:
            self.config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - the operator's model reference is wrong
            raise ModelLoadError(f"could not load the config of '{name}': {e}",
                                 param="model") from e
        self.context_length = context_length(self.config, self.tokenizer)
        if max_context is not None:
            self.context_length = min(self.context_length, max_context)
        self.eos_ids = self._eos_ids()
        self._chat_end: dict[str, frozenset[int]] = {}
        self._probed: dict[str, str] = {}
        self._token_texts: dict[int, str] = {}
        self._lock = threading.RLock()  # the chat-end probe renders a chat, which probes tools

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            eos = GenerationConfig.from_pretrained(self.name).eos_token_id
        except Exception:  # noqa: BLE001 - many models ship no generation_config.json
            eos = getattr(self.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(i for i in eos if isinstance(i, int))
        return frozenset(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (as logprobs show it)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    tools: list[dict[str, Any]] | None = None,
                    tool_format: ToolFormat | None = None) -> str:
        """Normalised OpenAI messages (``shared.chat.check_messages``) and tools as the prompt
        text of this model's chat template (``modelio.chat_template.render_chat``).

        Args:
            tools: function specs (``shared.chat.check_tools``).
            tool_format: how tools, calls and tool answers are rendered: an adapter's
                ``lorafleet.json["tool_format"]``; ``None``: this model's :meth:`tool_format`
                (what training chose for it).

        Raises:
            LorafleetError: the model has no chat template, or it refuses the chat
                (``param="messages"``).
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise LorafleetError(f"the model '{self.name}' has no chat template; "
                                 "use /v1/completions", param="messages")
        try:
            return chat_template.render_chat(self.tokenizer, messages, add_generation_prompt,
                                             tools, tool_format=tool_format or self.tool_format())
        except ValueError as e:
            raise LorafleetError(str(e), param="messages") from e

    def tool_format(self) -> ToolFormat:
        """How this model's chat template takes tools (``modelio.chat_template``'s probe,
        once)."""
        with self._lock:
            if "tool_format" not in self._probed:
                self._probed["tool_format"] = chat_template.probe_tool_format(self.tokenizer)
            return cast(ToolFormat, self._probed["tool_format"])

    def chat_end_ids(self) -> frozenset[int]:
        """The special token that closes an assistant turn in the chat template (ChatML's
        ``<|im_end|>``, Llama 3's ``<|eot_id|>``): generation of a chat reply stops there."""
        with self._lock:
            if "ids" not in self._chat_end:
                self._chat_end["ids"] = self._probe_chat_end()
            return self._chat_end["ids"]

    def _probe_chat_end(self) -> frozenset[int]:
        marker = "\x1fREPLY\x1f"
        try:
            full = self.render_chat([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": marker}], False)
        except Exception:  # noqa: BLE001 - a template that can't render this has no marker
            return frozenset()
        tail = full.split(marker, 1)[-1] if marker in full else ""
        ids = self.encode(tail)[:1]
        special = set(self.tokenizer.all_special_ids)
        return frozenset(i for i in ids if i in special)
