"""What the demo shows of a fine-tune, through the API: the job's evaluation card as a table,
and the base model's and the fine-tuned model's answers to one held-out dialogue side by side.

Best effort: the demo is about training, so an engine that is not ready or a request that
fails is reported, never fatal.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from shared.samples import SAMPLE_PATH
from shared.templates import PromptFormat

ENGINE_TIMEOUT_S = 60.0


def _say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def wait_engine(engine: str) -> bool:
    """Whether the inference engine answered ``/health`` within ``ENGINE_TIMEOUT_S``."""
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    while True:  # the engine loads torch while the job trains; usually ready by now
        try:
            if httpx.get(f"{engine}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            print("lorafleet demo: inference engine not ready; skipping the completion",
                  file=sys.stderr)
            return False
        time.sleep(0.5)


def _post(base: str, key: str, path: str, body: dict[str, Any], what: str) -> Any | None:
    """One request to the API; its JSON answer, or None (reported) if it failed: the demo is
    about training, so a failure here is not fatal."""
    try:
        r = httpx.post(f"{base}{path}", headers={"Authorization": f"Bearer {key}"}, json=body,
                       timeout=ENGINE_TIMEOUT_S + 120)
    except httpx.HTTPError as e:
        print(f"lorafleet demo: {what} failed: {e}", file=sys.stderr)
        return None
    if r.status_code != 200:
        print(f"lorafleet demo: {what} failed: HTTP {r.status_code} {r.text}", file=sys.stderr)
        return None
    return r.json()


def complete(base: str, key: str, model: str, prompt: str, max_tokens: int,
             stop: list[str] | None = None) -> str | None:
    """One greedy completion through the API's ``/v1/completions``; None (reported) if it
    failed."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, **({"stop": stop} if stop else {})}
    answer = _post(base, key, "/v1/completions", body, "completion")
    return None if answer is None else str(answer["choices"][0]["text"])


def try_completion(base: str, key: str, engine: str, model: str) -> None:
    """Ask the fine-tuned model to summarise the sample's first dialogue (the tiny model)."""
    with SAMPLE_PATH.open(encoding="utf-8") as fh:
        dialogue = json.loads(fh.readline())["dialogue"]
    if wait_engine(engine) and (text := complete(base, key, model, dialogue, 24)) is not None:
        _say(f"POST /v1/completions with {model}:")
        print(f"    {text!r}")


def show_evaluation(job: dict[str, Any]) -> None:
    """The job's evaluation card as a small table."""
    card = job.get("evaluation")
    if not card:
        print("lorafleet demo: the job has no evaluation card (see its events)", file=sys.stderr)
        return
    _say(f"ROUGE on {card['examples']} held-out dialogues, from the job's evaluation card (both "
         f"models given the fine-tune's prompt format; greedy, at most {card['max_new_tokens']} "
         "tokens):")
    print(f"    {'':12}{'ROUGE-1':>9}{'ROUGE-2':>9}{'ROUGE-L':>9}{'exact':>7}")
    for label, side in (("base model", "base"), ("fine-tuned", "fine_tuned")):
        s = card[side]
        print(f"    {label:12}{s['rouge1']:9.3f}{s['rouge2']:9.3f}{s['rougeL']:9.3f}"
              f"{s['exact_match']:7.0%}")


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int) -> str:
    """Two titled texts in two columns (one under the other when ``width`` is narrow)."""
    column = (width - 7) // 2
    if column < 30:
        return "\n".join(f"    {title}\n" + textwrap.indent(textwrap.fill(text, width - 6), " " * 6)
                         for title, text in (left, right))
    cols = [[*textwrap.wrap(title, column), *textwrap.wrap(text, column)]
            for title, text in (left, right)]
    rows = itertools.zip_longest(*cols, fillvalue="")
    return "\n".join(f"    {a:<{column}} | {b}".rstrip() for a, b in rows)


def chat(base: str, key: str, model: str, content: str, max_tokens: int) -> str | None:
    """One greedy reply through the API's ``/v1/chat/completions``; None (reported) if it
    failed."""
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0}
    answer = _post(base, key, "/v1/chat/completions", body, "chat completion")
    return None if answer is None else str(answer["choices"][0]["message"]["content"])


def compare_answers(base: str, key: str, engine: str, job: dict[str, Any],
                    validation: Path) -> None:
    """One held-out dialogue, summarised by the base model and by the fine-tuned model, side by
    side. The base model is asked as an instruction-tuned model is best asked, in its own chat
    template (``/v1/chat/completions``); the fine-tuned model through ``/v1/completions``,
    which wraps the dialogue in the prompt format it was trained on."""
    record = json.loads(validation.read_text(encoding="utf-8").splitlines()[0])
    dialogue = record["dialogue"]
    instruction = PromptFormat.model_validate(job["prompt_format"]).instruction
    if not wait_engine(engine):
        return
    # The fine-tuned model first: on a CPU the engine starts the base model's vLLM server at
    # the adapter's rank, which the base model's request then shares (asked first, the base
    # model would start it at the lowest rank, and the adapter would restart it).
    tuned_text = complete(base, key, job["fine_tuned_model"], dialogue, 64)
    base_text = chat(base, key, job["model"], f"{instruction}\n\n{dialogue}", 64)
    if base_text is None or tuned_text is None:
        return
    _say("a held-out dialogue (not trained on):")
    print(textwrap.indent(dialogue, "    "))
    print(f"    reference summary: {record['summary']}")
    _say(f"base model ({Path(job['model']).name}, POST /v1/chat/completions: \"{instruction}\" "
         "and the dialogue) | fine-tuned model (POST /v1/completions: the dialogue); greedy:")
    width = shutil.get_terminal_size((100, 24)).columns
    print(side_by_side(("base model:", base_text.strip()),
                       (f"{job['fine_tuned_model']}:", tuned_text.strip()), width))
