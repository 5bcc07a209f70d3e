"""Write function-calling chats in OpenAI's fine-tuning format, for ``bench/tools.py``.

Each line is one request answered by exactly one tool call, as OpenAI's cookbook's
function-calling files are (``examples/data/drone_training.jsonl``): the tools at the top level,
``parallel_tool_calls: false``, a system message, the user's request, and an assistant message
with ``tool_calls`` (the arguments a JSON string) and no ``content``. Four tools:
``get_weather``, ``book_table``, ``convert_units`` and ``reject_request`` (for what none of the
others serves). Requests are composed from phrasings and value pools, seeded, so the same
arguments write the same file::

    python scripts/generate_tool_chats.py --out tool_chats.jsonl [--count 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

COUNT = 300
SYSTEM = "You are a helpful assistant. Answer each request with exactly one function call."


def _tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties)}}}


TOOLS = [
    _tool("get_weather", "Current weather in a city.", {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}),
    _tool("book_table", "Book a restaurant table.", {
        "restaurant": {"type": "string"}, "party_size": {"type": "integer"},
        "time": {"type": "string", "description": "HH:MM"}}),
    _tool("convert_units", "Convert a quantity to another unit.", {
        "value": {"type": "number"}, "from_unit": {"type": "string"},
        "to_unit": {"type": "string"}}),
    _tool("reject_request", "Decline a request that no other function serves.", {}),
]

CITIES = ["Lisbon", "Chicago", "Osaka", "Toronto", "Madrid", "Sydney", "Prague", "Denver",
          "Nairobi", "Oslo", "Lima", "Seoul", "Dublin", "Cairo", "Austin", "Hanoi", "Zurich",
          "Boston", "Mumbai", "Quito"]
UNITS = {"celsius": ["Celsius", "°C", "celsius"], "fahrenheit": ["Fahrenheit", "°F",
                                                                 "fahrenheit"]}
RESTAURANTS = ["Luigi's", "The Blue Door", "Sakura", "El Patio", "Green Table", "Noma",
               "Casa Rosa", "The Oak Room", "Bistro 21", "Golden Dragon", "Chez Marie",
               "Harbor Grill"]
CONVERSIONS = [("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"),
               ("liters", "gallons"), ("gallons", "liters"), ("meters", "feet"),
               ("feet", "meters"), ("celsius", "fahrenheit"), ("inches", "cm")]
OFF_TOPIC = ["Write me a poem about the sea.", "Order me a pizza with extra cheese.",
             "What is the meaning of life?", "Can you send an email to my boss?",
             "Play some jazz music.", "Tell me a joke about cats.",
             "Translate 'good morning' into Japanese.", "Book me a flight to Rome.",
             "What's 17 times 23?", "Set an alarm for 6 am.", "Who won the World Cup in 2010?",
             "Remind me to buy milk tomorrow.", "Recommend a good novel.",
             "Turn off the living room lights."]


def _weather(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    city, unit = rng.choice(CITIES), rng.choice(sorted(UNITS))
    word = rng.choice(UNITS[unit])
    text = rng.choice([
        f"What's the weather in {city} in {word}?",
        f"How warm is it in {city} right now? Use {word}.",
        f"Give me the current weather for {city}, in {word} please.",
        f"Is it cold in {city} today? Answer in {word}.",
    ])
    return text, "get_weather", {"city": city, "unit": unit}


def _booking(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    place, size = rng.choice(RESTAURANTS), rng.randint(1, 10)
    time = f"{rng.randint(11, 22):02d}:{rng.choice(['00', '15', '30', '45'])}"
    text = rng.choice([
        f"Book a table for {size} at {place} at {time}.",
        f"Can you reserve {place} for {size} people at {time}?",
        f"We are {size}; get us a table at {place} for {time}.",
        f"Please make a reservation at {place}, party of {size}, {time}.",
    ])
    return text, "book_table", {"restaurant": place, "party_size": size, "time": time}


def _conversion(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    source, target = rng.choice(CONVERSIONS)
    value: int | float = (rng.randint(1, 500) if rng.random() < 0.6
                          else round(rng.uniform(0.5, 300), 1))
    text = rng.choice([
        f"Convert {value} {source} to {target}.",
        f"How many {target} is {value} {source}?",
        f"What is {value} {source} in {target}?",
        f"I need {value} {source} expressed in {target}.",
    ])
    return text, "convert_units", {"value": value, "from_unit": source, "to_unit": target}


def _rejection(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    return rng.choice(OFF_TOPIC), "reject_request", {}


def chat(i: int, request: str, function: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One training line: the request answered by one call."""
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": function, "arguments": json.dumps(arguments)}}
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": request},
                         {"role": "assistant", "tool_calls": [call]}],
            "tools": TOOLS, "parallel_tool_calls": False}


def generate(count: int = COUNT, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` chats, the four tools in turn (so any slice has each about as often)."""
    rng = random.Random(seed)
    makers = [_weather, _booking, _conversion, _rejection]
    return [chat(i, *makers[i % len(makers)](rng)) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = generate(args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} chats to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
