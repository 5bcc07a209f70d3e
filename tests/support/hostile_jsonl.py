"""Hypothesis strategies for pathological JSONL: what an upload or a training file may hold.

Extreme numbers (1e308, 1e309, -0, NaN and Infinity literals, integers past Python's 4300-digit
limit), nesting deep enough to hit ``RecursionError``, huge strings, odd Unicode (lone
surrogates as ``\\ud800`` escapes or as raw bytes, NUL, bidi controls, non-characters, BOMs),
every JSON type where a known shape wants text, lines that are not objects, invalid UTF-8.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

from shared.records import CHAT_ROLES, SHAPES

ODD_CHARS = [
    "\x00", "\x1f", "\x7f", "\u0085", "\u2028", "\u2029",  # NUL, controls, line separators
    "\u202e", "\u2066", "\u200f", "\u200b",  # bidi overrides and isolates, zero width
    "\ufeff", "\ufffe", "\uffff", "\U0010ffff", "\U0001fffe",  # BOM, non-characters
    "\U0001f600", "\u0301", '"', "\\", "\n", "\r", "\t", "{", "}",
]
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
HUGE = 30_000  # characters: past the limits the tests set, well under the upload's bytes

short_text = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from(ODD_CHARS),
                     max_size=24)
huge_text = st.builds(lambda n, c: c * n, st.integers(1_000, HUGE),
                      st.sampled_from(["x", "\u00e9", "\U0001f600", "\x00", "\ud800"]))
surrogate_text = st.builds(lambda a, s, b: a + s + b, short_text,
                           st.sampled_from(LONE_SURROGATES), short_text)
# Repeated branches weigh more: mostly short text, which lets records reach the column checks.
text = st.one_of(short_text, short_text, short_text, short_text, huge_text, surrogate_text)
numbers = st.integers() | st.floats() | st.sampled_from([1e308, -0.0, 5e-324, 2**63, -(2**64)])
scalars = st.none() | st.booleans() | numbers | text
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(short_text, kids, max_size=4),
    max_leaves=12,
)

# A known shape's columns, each holding any JSON value: text most often, since that is what
# reaches the deeper checks. Chat messages mix OpenAI's whole shape (text parts, tool calls and
# the tool messages answering them, weights, names) with values of any type in every field.
call_ids = st.sampled_from(["call_1", "call_2", "c", ""]) | json_values
function_names = st.sampled_from(["get_weather", "book_table", "bad name", ""]) | json_values
arguments = st.one_of(
    st.dictionaries(short_text, json_values, max_size=3).map(json.dumps),
    st.sampled_from(["{", "[]", "null", '{"a": 1}', '{"a": 1e999}', "{}" + "x"]),
    json_values,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": call_ids,
         "function": st.fixed_dictionaries({"name": function_names, "arguments": arguments})
         | json_values},
        optional={"type": st.sampled_from(["function", "code"]) | json_values}),
    max_size=3,
) | json_values
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values,
                           "text": text | json_values}),
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*CHAT_ROLES, "robot", "function", ""]) | json_values},
        optional={"content": text | content_parts | json_values, "tool_calls": tool_calls,
                  "tool_call_id": call_ids,
                  "weight": st.sampled_from([0, 1, 2, True, 0.5, "1"]) | json_values,
                  "name": short_text | json_values}),
    max_size=5,
) | json_values
tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "retrieval"]) | json_values,
         "function": st.fixed_dictionaries(
             {"name": function_names},
             optional={"description": text | json_values,
                       "parameters": st.just({"type": "object"}) | json_values})}),
    max_size=3,
) | json_values
column_values = {"messages": messages, "tools": tools,
                 "parallel_tool_calls": st.booleans() | json_values,
                 # A preference pair's columns: an input conversation, one-message outputs.
                 "input": st.fixed_dictionaries(
                     {"messages": messages},
                     optional={"tools": tools,
                               "parallel_tool_calls": st.booleans() | json_values})
                 | json_values,
                 "preferred_output": messages, "non_preferred_output": messages}
shaped_records = st.sampled_from(sorted(SHAPES)).flatmap(
    lambda shape: st.fixed_dictionaries(
        {col: column_values.get(col, text | json_values) for col in SHAPES[shape][0]},
        optional={col: column_values.get(col, text | json_values) for col in SHAPES[shape][1]},
    )
)
records = shaped_records | st.dictionaries(short_text, json_values, max_size=5)
words = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from(ODD_CHARS),
                min_size=1, max_size=24).filter(str.strip)
good_records = st.one_of(
    st.fixed_dictionaries({"prompt": words, "completion": words}),
    st.fixed_dictionaries({"dialogue": words, "summary": words}, optional={"topic": words}),
    st.fixed_dictionaries({"instruction": words, "response": words},
                          optional={"context": words}),
    st.builds(lambda u, a: {"messages": [{"role": "user", "content": u},
                                         {"role": "assistant", "content": a}]}, words, words),
    st.builds(lambda u, a, b: {"input": {"messages": [{"role": "user", "content": u}]},
                               "preferred_output": [{"role": "assistant", "content": a}],
                               "non_preferred_output": [{"role": "assistant", "content": b}]},
              words, words, words),
)
TOOL_SPECS = [{"type": "function", "function": {
    "name": name, "description": f"{name} tool",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    for name in ("get_weather", "book_table", "convert_units")]
TOOL_NAMES = [spec["function"]["name"] for spec in TOOL_SPECS]


@st.composite
def good_chats(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat record in OpenAI's whole shape: several turns, some calling tools and
    reading their answers, weights on some assistant messages (the last one learned)."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])),
                         "content": draw(words)})
    turns = draw(st.integers(1, 3))
    for turn in range(turns):
        said = draw(words)
        messages.append({"role": "user", "content": draw(st.sampled_from(
            [said, [{"type": "text", "text": said}]]))})
        for round_ in range(draw(st.integers(0, 2))):
            calls = [{"id": f"call_{turn}_{round_}_{j}", "type": "function", "function": {
                "name": draw(st.sampled_from(TOOL_NAMES)),
                "arguments": json.dumps(draw(st.dictionaries(words, words, max_size=2)))}}
                for j in range(draw(st.integers(1, 2)))]
            call: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
            if draw(st.booleans()):
                call["content"] = draw(words)
            if draw(st.booleans()):
                call["weight"] = draw(st.sampled_from([0, 1]))
            messages.append(call)
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": draw(words)}
                         for c in calls]
        reply: dict[str, Any] = {"role": "assistant", "content": draw(words)}
        if turn < turns - 1 and draw(st.booleans()):
            reply["weight"] = draw(st.sampled_from([0, 1]))
        messages.append(reply)
    record: dict[str, Any] = {"messages": messages}
    if draw(st.booleans()) or any("tool_calls" in m for m in messages):
        record["tools"] = copy.deepcopy(TOOL_SPECS)  # broken_chats changes what it draws
    if draw(st.booleans()):
        record["parallel_tool_calls"] = True
    return record


def _encode(value: Any, ensure_ascii: bool) -> bytes:
    # surrogatepass: a lone surrogate left raw becomes bytes that are not UTF-8
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def _nested(depth: int, escape: bool) -> bytes:
    # A record whose extra column nests `depth` deep; an escape sends it through the
    # lone-surrogate check, which encodes the record again a few frames further down.
    return (b'{"prompt": "p' + (b"\\u00e9" if escape else b"") + b'", "completion": "c", "x": '
            + b"[" * depth + b"]" * depth + b"}")


@st.composite
def broken_chats(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat record with one value somewhere inside replaced by any JSON value, or
    removed: reaches every check of a chat, however deep."""
    record = draw(good_chats())
    node: Any = record
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, dict | list) or not child or draw(st.integers(0, 7)) == 0:
            break
        node = child
    if isinstance(node, dict) and draw(st.booleans()):
        del node[key]
    else:
        node[key] = draw(json_values | st.sampled_from(["robot", "tool", "assistant", 0, 1]))
    return record


raw_lines = st.one_of(
    st.sampled_from([
        b"NaN", b"-Infinity", b"-0", b"1e308", b"1e309", b"[]", b"null", b'"text"', b"{",
        b"\xef\xbb\xbf{}", b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b'{"a": 1} {"b": 2}',
        b'{"a": "\\ud800"}', b'{"\\udc00": "key"}', b'{"a": "\\ud83d\\ude00"}',
        b'{"prompt": NaN, "completion": Infinity}', b'{"prompt": "p", "completion": -0}',
        b'{"dialogue": "\\u0000", "summary": "\\u202e"}',
    ]),
    st.builds(_nested, st.integers(1, 20_000), st.booleans()),
    st.integers(1, 20_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4_000, 6_000).map(
        lambda n: b'{"prompt": "p", "completion": "c", "n": ' + b"9" * n + b"}"),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)
lines = st.one_of(
    st.builds(_encode, good_records, st.booleans()),
    st.builds(_encode, good_records, st.booleans()),
    st.builds(_encode, good_chats(), st.booleans()),
    st.builds(_encode, broken_chats(), st.booleans()),
    st.builds(_encode, records, st.booleans()),
    st.builds(_encode, json_values, st.booleans()),
    raw_lines,
    st.sampled_from([b"", b"   ", b"\r", b"\t"]),
)


@st.composite
def jsonl_files(draw: st.DrawFn, max_lines: int = 6) -> bytes:
    """A file of a few lines; its first line is often a good record, so that later lines are
    checked against a known shape."""
    body = draw(st.lists(lines, max_size=max_lines))
    if draw(st.booleans()):
        body.insert(0, b'{"prompt": "p", "completion": "c"}')
    content = b"\n".join(body) + (b"\n" if draw(st.booleans()) else b"")
    return draw(st.sampled_from([b""] * 7 + [b"\xef\xbb\xbf"])) + content  # a BOM, at times
