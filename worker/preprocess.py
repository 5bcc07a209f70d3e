"""Records → token ids and labels, as the recipe does it, with loss masking and a cache.

The seed recipe tokenizes in batches with a ``max_length``, drops samples whose ``input_ids``
reach ``max_length`` and copies ``input_ids`` as labels. We keep that rule for dropping, and by
default put the loss on the response tokens only (``train_on_inputs=True`` restores the seed's
labels). Prompt and response are tokenized separately so that the boundary the model learns is
exactly the one inference sees (a prompt tokenized alone, then generated tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from shared import storage
from shared.errors import InvalidDataset, StorageUnavailable
from shared.records import iter_examples
from shared.schemas import TrainingSpec
from shared.storage import ObjectMissing, folders
from shared.storage.folders import DamagedFolder
from shared.templates import Rendered, render

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PREPROCESS_VERSION = "1"  # bump when the token layout changes, so caches are rebuilt
TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class Prepared:
    train: Dataset
    validation: Dataset | None
    examples: int
    dropped_too_long: int
    validation_examples: int | None
    cached: bool


def chat_renderer(tokenizer: Any):  # type: ignore[no-untyped-def]
    """The tokenizer's chat template as a ``templates.ChatRenderer``."""

    def _render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidDataset("the chat format needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return _render


def render_file(path: Path, spec: TrainingSpec, tokenizer: Any, param: str) -> list[Rendered]:
    """Render every record of a stored JSONL file with the job's prompt format; records are
    checked as a job's files are (``records.iter_examples``).

    Raises:
        InvalidDataset: naming the line of a record that does not fit.
    """
    fmt = spec.prompt_format
    renderer = chat_renderer(tokenizer) if fmt.type == "chat" else None
    out = []
    for lineno, example in iter_examples(path, column_map=spec.column_map, prompt_format=fmt,
                                         param=param):
        try:  # RecursionError: a custom template may print a column nested near the limit
            out.append(render(fmt, example, renderer))
        except (ValueError, RecursionError) as e:
            raise InvalidDataset(f"{param} line {lineno}: {e}", param=param) from e
    return out


def tokenize(
    rendered: list[Rendered], tokenizer: Any, max_length: int, train_on_inputs: bool
) -> tuple[dict[str, list[list[int]]], int]:
    """Batch-tokenize; returns columns ``input_ids``/``labels`` and the number dropped."""
    eos = tokenizer.eos_token_id
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    dropped = 0
    for start in range(0, len(rendered), TOKENIZE_BATCH):
        chunk = rendered[start : start + TOKENIZE_BATCH]
        prompts = tokenizer([r.prompt for r in chunk], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r.response for r in chunk], add_special_tokens=False)["input_ids"]
        for p, r in zip(prompts, responses, strict=True):
            ids = p + r + ([eos] if eos is not None else [])
            if len(ids) >= max_length:  # the seed's rule: drop what reaches max_length
                dropped += 1
                continue
            input_ids.append(ids)
            labels.append(ids.copy() if train_on_inputs else [IGNORE_INDEX] * len(p) + ids[len(p):])
    return {"input_ids": input_ids, "labels": labels}, dropped


def fingerprint(spec: TrainingSpec, tokenizer: Any, file_hashes: list[str]) -> str:
    """Key of the preprocessed-data cache: data, format, tokenizer and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    key = {
        "v": PREPROCESS_VERSION,
        "files": file_hashes,
        "format": spec.prompt_format.model_dump(mode="json"),
        "column_map": spec.column_map,
        "max_length": spec.max_length,
        "train_on_inputs": spec.train_on_inputs,
        "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _build(path: Path, spec: TrainingSpec, tokenizer: Any, param: str) -> tuple[Dataset, int]:
    rendered = render_file(path, spec, tokenizer, param)
    columns, dropped = tokenize(rendered, tokenizer, spec.max_length, spec.train_on_inputs)
    return Dataset.from_dict(columns), dropped


def prepare(
    spec: TrainingSpec,
    tokenizer: Any,
    train_path: Path,
    train_hash: str,
    valid_path: Path | None = None,
    valid_hash: str | None = None,
) -> Prepared:
    """Tokenized train (and validation) sets, from the cache when an attempt already built them.

    Raises:
        InvalidDataset: a bad record, or no example shorter than ``max_length``.
    """
    key = fingerprint(spec, tokenizer, [train_hash, valid_hash or ""])
    folder = storage.dataset_cache_key(train_hash, key)
    cached = _load_cached(folder)
    if cached is not None:
        return cached

    train, dropped = _build(train_path, spec, tokenizer, "training_file")
    if len(train) == 0:
        raise InvalidDataset(
            f"training_file: all {dropped} examples reach max_length={spec.max_length} tokens "
            "and were dropped; raise max_length or shorten the records",
            param="max_length",
        )
    valid = None
    if valid_path is not None:
        valid, _ = _build(valid_path, spec, tokenizer, "validation_file")
        if len(valid) == 0:
            raise InvalidDataset(
                f"validation_file: every example reaches max_length={spec.max_length}",
                param="validation_file",
            )
    meta = {"examples": len(train), "dropped": dropped,
            "validation": len(valid) if valid is not None else None}
    _store_cached(folder, train, valid, meta)
    return Prepared(train, valid, len(train), dropped, meta["validation"], False)


def _load_cached(folder: str) -> Prepared | None:
    """The data sets an earlier attempt built with the same fingerprint, from storage."""
    try:
        local = storage.get_cache().folder(storage.get_store(), folder)
        meta = json.loads((local / "meta.json").read_text())
        train = load_from_disk(str(local / "train"))
        valid = load_from_disk(str(local / "validation")) if meta["validation"] else None
    except (ObjectMissing, DamagedFolder, StorageUnavailable, OSError, ValueError, KeyError):
        return None  # not built yet, or unreadable: build it (again)
    return Prepared(train, valid, meta["examples"], meta["dropped"], meta["validation"], True)


def _store_cached(folder: str, train: Dataset, valid: Dataset | None,
                  meta: dict[str, Any]) -> None:
    """Keep the data sets for later attempts. Built locally, then committed in storage; two
    attempts building the same set at once each write their own files, and the first commit
    wins (theirs are identical). A store that cannot take it costs the cache, not the job."""
    work = storage.get_cache().workspace("datasets", f"{os.getpid()}.{uuid.uuid4().hex}")
    try:
        train.save_to_disk(str(work / "train"))
        if valid is not None:
            valid.save_to_disk(str(work / "validation"))
        (work / "meta.json").write_text(json.dumps(meta))
        folders.commit_folder(storage.get_store(), work, folder, base=uuid.uuid4().hex)
    except (folders.AlreadyCommitted, StorageUnavailable) as e:
        log.info("preprocessed data %s not cached: %s", folder, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
