"""What lorafleet does with each field of OpenAI's completion and chat completion requests.

Every request field the openai SDK can send is decided here or declared as a field of the
request models (``shared.inference``): a field that is declared is honoured; a field in
:data:`REFUSED` is refused with a 400 that names it and says why, unless its value asks for
nothing (``service_tier: "auto"``, ``store: false``); a field in :data:`WITHOUT_EFFECT` is
accepted and documented as changing nothing. Any other field is refused as unrecognized, as
OpenAI does, so that no field is dropped in silence (``tests/shared/test_request_fields.py``
holds this table against the SDK's typed parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidRequest


class UnsupportedParameter(InvalidRequest):
    """A request field (or value) this server does not serve; ``param`` names it."""

    code = "unsupported_parameter"


def _unset(value: Any) -> bool:
    return value is None


@dataclass(frozen=True)
class Refusal:
    """Why a field is refused, and which values ask for nothing and pass."""

    reason: str
    passes: Callable[[Any], bool] = _unset


REFUSED_COMPLETION: dict[str, Refusal] = {
    "suffix": Refusal("inserting text before a suffix needs a fill-in-the-middle model; "
                      "lorafleet's models complete prompts",
                      lambda v: v in (None, "")),
    "best_of": Refusal("vLLM generates no best-of candidates; ask for `n` choices with "
                       "`logprobs` and pick", lambda v: v in (None, 1)),
}

REFUSED_CHAT: dict[str, Refusal] = {
    "audio": Refusal("lorafleet's models take and produce text only"),
    "modalities": Refusal("lorafleet's models produce text only",
                          lambda v: v is None or v == ["text"]),
    "functions": Refusal("the deprecated functions API is not served: send `tools`"),
    "function_call": Refusal("the deprecated functions API is not served: send `tool_choice`"),
    "prediction": Refusal("predicted outputs are not served"),
    "web_search_options": Refusal("lorafleet's models have no web search"),
    "reasoning_effort": Refusal("lorafleet serves no reasoning models whose effort is set"),
    "verbosity": Refusal("lorafleet's models have no verbosity setting"),
    "moderation": Refusal("lorafleet runs no moderation"),
    "store": Refusal("lorafleet does not store chat completions",
                     lambda v: v in (None, False)),
    "metadata": Refusal("metadata is kept with stored chat completions, and lorafleet "
                        "stores none", lambda v: not v),
    "service_tier": Refusal("lorafleet has one service tier: send 'auto' or 'default'",
                            lambda v: v in (None, "auto", "default")),
}

# Accepted, and documented as changing nothing (README, "Inference"): each says why.
WITHOUT_EFFECT: dict[str, str] = {
    "user": "an end-user id for the provider's abuse monitoring; lorafleet keeps no "
            "per-user policy",
    "safety_identifier": "an end-user id for the provider's abuse monitoring; lorafleet "
                         "keeps no per-user policy",
    "prompt_cache_key": "vLLM caches prompt prefixes by itself, whatever the key",
    "prompt_cache_retention": "vLLM caches prompt prefixes by itself, for as long as it has "
                              "room",
    "prompt_cache_options": "vLLM caches prompt prefixes by itself, for as long as it has room",
}

# lorafleet's own extensions (besides the SDK's fields).
EXTENSIONS = frozenset({"raw_prompt"})


def check_fields(data: Any, declared: Mapping[str, Any], refused: Mapping[str, Refusal]
                 ) -> None:
    """Refuse the fields of a request body ``data`` that are not served.

    Args:
        data: the request body, before validation.
        declared: the request model's fields (honoured, or in ``refused``).
        refused: the endpoint's refusals.

    Raises:
        UnsupportedParameter: a refused field with a value that asks for something, or a
            field nobody declared.
    """
    if not isinstance(data, Mapping):
        return
    for name, value in data.items():
        refusal = refused.get(name)
        if refusal is not None:
            # ``passes`` sees the raw value, whatever its type: the models check types later.
            if not refusal.passes(value):
                raise UnsupportedParameter(f"'{name}' is not supported: {refusal.reason}",
                                           param=name)
        elif name not in declared:
            raise UnsupportedParameter(f"Unrecognized request argument supplied: {name}",
                                       param=name, code="unknown_parameter")
