"""Preference (DPO) files in OpenAI's format: the documented example line, and pairs made from
DialogSum whose preferred answer is the reference summary and whose non-preferred answer echoes
the dialogue's first lines (what a base model tends to answer)."""

from __future__ import annotations

from typing import Any

from tests.support.jobs import dialogsum_records, jsonl_bytes, upload_bytes

# OpenAI's fine-tuning guide's DPO example, as a line of a training file.
OPENAI_EXAMPLE: dict[str, Any] = {
    "input": {
        "messages": [
            {"role": "user",
             "content": "Hello, can you tell me how cold San Francisco is today?"},
        ],
        "tools": [],
        "parallel_tool_calls": True,
    },
    "preferred_output": [
        {"role": "assistant",
         "content": "Today in San Francisco, it is not quite cold as expected. Morning clouds "
                    "will give away to sunshine, with a high near 68°F (20°C) and a low around "
                    "57°F (14°C)."},
    ],
    "non_preferred_output": [
        {"role": "assistant",
         "content": "It is not particularly cold in San Francisco today."},
    ],
}


def dialogsum_pair(record: dict[str, Any]) -> dict[str, Any]:
    """One DialogSum record as a preference pair."""
    echo = "\n".join(record["dialogue"].splitlines()[:2])
    return {
        "input": {"messages": [
            {"role": "system", "content": "You summarise conversations in one or two sentences."},
            {"role": "user", "content": f"Summarize the below conversation.\n\n"
                                        f"{record['dialogue']}"},
        ]},
        "preferred_output": [{"role": "assistant", "content": record["summary"]}],
        "non_preferred_output": [{"role": "assistant", "content": echo}],
    }


def preference_pairs(n: int, split: str = "train", offset: int = 0) -> list[dict[str, Any]]:
    """``n`` pairs from DialogSum records ``offset ..`` of ``split``."""
    return [dialogsum_pair(r) for r in dialogsum_records(n, split, offset)]


def upload_preference(client: Any, n: int, split: str = "train", offset: int = 0) -> Any:
    """Upload ``n`` DialogSum preference pairs (see :func:`upload_bytes`)."""
    return upload_bytes(client, jsonl_bytes(preference_pairs(n, split, offset)),
                        f"preference-{split}-{n}.jsonl")
