"""The tool-calling benchmark's pieces that need no training: the seeded chats are valid
OpenAI function-calling records, and an answer scores only with the expected call."""

from __future__ import annotations

import json
from pathlib import Path

from bench.tools import QUICK, expected_call, judge, write_chats
from shared.chat import check_chat
from shared.hermes import assistant_text
from shared.records import validate_file


def test_the_generator_writes_valid_chats_the_same_every_time(tmp_path: Path) -> None:
    records = write_chats(tmp_path / "a.jsonl", QUICK)
    again = write_chats(tmp_path / "b.jsonl", QUICK)

    summary = validate_file(tmp_path / "a.jsonl")
    assert (summary.count, summary.shape) == (QUICK.chats, "chat")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert records == again
    names = [expected_call(r)[0] for r in records]
    assert set(names) == {"get_weather", "book_table", "convert_units", "reject_request"}
    for record in records:
        chat = check_chat(record)
        assert chat.parallel_tool_calls is False and chat.learned == (2,)
        assert chat.messages[-1]["content"] is None


def test_only_the_expected_call_scores(tmp_path: Path) -> None:
    records = write_chats(tmp_path / "chats.jsonl", QUICK)[:4]
    right = [assistant_text(check_chat(r).messages[-1]) for r in records]
    name, arguments = expected_call(records[0])
    wrong_arguments = right[0].replace(json.dumps(arguments), json.dumps({"x": 1}))

    perfect = judge(right, records)
    mixed = judge([wrong_arguments, "I cannot call tools.", *right[2:]], records)

    assert (perfect.exact, perfect.name, perfect.parsed) == (1.0, 1.0, 1.0)
    assert (mixed.exact, mixed.name, mixed.parsed) == (0.5, 0.75, 0.75)
    assert mixed.per_tool[name] == 0.0
    assert set(perfect.per_tool.values()) == {1.0}
