"""Preference pairs → token ids for a DPO job, laid out as TRL's ``DPOTrainer`` consumes them
(``prompt_ids``, ``chosen_ids``, ``rejected_ids``) and tokenized as supervised jobs tokenize:
the prompt alone, rendered in the job's prompt format exactly as inference renders a request,
then each answer with the end-of-sequence token. The boundary the adapter learns is the one
inference sees; ``max_length`` drops what reaches it, as for supervised jobs, so a pair is
never cut (TRL would truncate it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset

from shared import preference
from shared.errors import InvalidDataset
from shared.hermes import ToolFormat
from shared.records import iter_examples
from shared.schemas import TrainingSpec
from shared.templates import Rendered, render
from worker.preprocess import TOKENIZE_BATCH, Prepared, chat_renderer, prepare

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def render_pairs(path: Path, spec: TrainingSpec, tokenizer: Any, param: str,
                 tools_as: ToolFormat | None = None) -> list[tuple[Rendered, Rendered]]:
    """The chosen and the rejected rendering of every record of a preference file.

    Raises:
        InvalidDataset: naming the line of a record that is not a preference pair or that the
            job's format cannot render.
    """
    fmt = spec.prompt_format
    renderer = chat_renderer(tokenizer, tools_as) if fmt.type == "chat" else None
    out = []
    for lineno, example in iter_examples(path, prompt_format=fmt, param=param):
        if example.shape != preference.SHAPE:
            raise InvalidDataset(f"{param} line {lineno}: a DPO job trains on preference pairs "
                                 f"and this record is {example.shape}", param=param)
        chosen, rejected = preference.pair(example)
        try:  # RecursionError: a chat template may recurse on a deeply nested message
            out.append((render(fmt, chosen, renderer), render(fmt, rejected, renderer)))
        except (ValueError, RecursionError) as e:
            raise InvalidDataset(f"{param} line {lineno}: {e}", param=param) from e
    return out


def tokenize_pairs(pairs: list[tuple[Rendered, Rendered]], tokenizer: Any,
                   max_length: int) -> tuple[dict[str, list[list[int]]], int]:
    """Columns :data:`COLUMNS`, and the number of pairs dropped because prompt and one of the
    answers reach ``max_length`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    columns: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    dropped = 0
    for start in range(0, len(pairs), TOKENIZE_BATCH):
        chunk = pairs[start:start + TOKENIZE_BATCH]

        def ids(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

        prompts = ids([chosen.prompt for chosen, _ in chunk])
        chosen = ids([c.response for c, _ in chunk])
        rejected = ids([r.response for _, r in chunk])
        for p, c, r in zip(prompts, chosen, rejected, strict=True):
            if len(p) + max(len(c), len(r)) + len(eos) >= max_length:
                dropped += 1
                continue
            columns["prompt_ids"].append(p)
            columns["chosen_ids"].append(c + eos)
            columns["rejected_ids"].append(r + eos)
    return columns, dropped


def build(path: Path, spec: TrainingSpec, tokenizer: Any, param: str,
          tools_as: ToolFormat | None) -> tuple[Dataset, int]:
    """One preference file as a data set (a ``worker.preprocess.Builder``); ``tools_as``: how
    the job renders tools (``worker.preprocess.tool_format``)."""
    # The two renderings of a pair share their prompt (the same messages before the answer):
    # the chosen one's is the pair's.
    columns, dropped = tokenize_pairs(render_pairs(path, spec, tokenizer, param, tools_as),
                                      tokenizer, spec.max_length)
    return Dataset.from_dict(columns), dropped


def prepare_pairs(spec: TrainingSpec, tokenizer: Any, train_path: Path, train_hash: str,
                  valid_path: Path | None = None, valid_hash: str | None = None) -> Prepared:
    """The job's preference files as data sets, cached across attempts as supervised data is."""
    return prepare(spec, tokenizer, train_path, train_hash, valid_path, valid_hash, build=build)
