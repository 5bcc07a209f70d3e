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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from modelio.chat_template import chat_renderer as make_chat_renderer
from modelio.chat_template import probe_tool_format
from shared import storage
from shared.errors import InvalidDataset, StorageUnavailable
from shared.hermes import ToolFormat
from shared.records import iter_examples
from shared.schemas import TrainingSpec
from shared.storage import ObjectMissing, folders
from shared.storage.folders import DamagedFolder
from shared.templates import ChatRenderer, Rendered, render

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PREPROCESS_VERSION = "2"  # bump when the token layout changes, so caches are rebuilt
TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class Prepared:
    train: Dataset
    validation: Dataset | None
    examples: int
    dropped_too_long: int
    validation_examples: int | None
    cached: bool
    # How chats with tools were rendered (``modelio.chat_template``); None: not a chat job.
    tool_format: ToolFormat | None = None


def tool_format(spec: TrainingSpec, tokenizer: Any) -> ToolFormat | None:
    """How the job renders chats with tools (``modelio.chat_template``'s probe of the
    tokenizer); ``None`` for the formats that take no tools."""
    return probe_tool_format(tokenizer) if spec.prompt_format.type == "chat" else None


def chat_renderer(tokenizer: Any, tools_as: ToolFormat | None = None) -> ChatRenderer:
    """The tokenizer's chat template as a ``templates.ChatRenderer``, tools rendered
    ``tools_as`` (``None``: as the probe of the tokenizer says).

    Raises:
        InvalidDataset: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidDataset("the chat format needs a tokenizer with a chat template",
                             param="prompt_format")
    return make_chat_renderer(tokenizer, tools_as or probe_tool_format(tokenizer))


def render_file(path: Path, spec: TrainingSpec, tokenizer: Any, param: str,
                tools_as: ToolFormat | None = None) -> list[Rendered]:
    """Render every record of a stored JSONL file with the job's prompt format; records are
    checked as a job's files are (``records.iter_examples``).

    Args:
        tools_as: the tool format of a chat job (:func:`tool_format`; ``None``: probed).

    Raises:
        InvalidDataset: naming the line of a record that does not fit.
    """
    fmt = spec.prompt_format
    renderer = chat_renderer(tokenizer, tools_as) if fmt.type == "chat" else None
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
    """Batch-tokenize; returns columns ``input_ids``/``labels`` and the number dropped.

    Each piece of an example (its prompt and response, or a chat's ``segments``) is tokenized
    on its own, so that a learned turn starts on a token boundary exactly where inference's
    prompt ends; the tokenizer's EOS follows the last piece and is learned with it. Labels
    are ``-100`` on the pieces not learned (unless ``train_on_inputs``).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    dropped = 0
    for start in range(0, len(rendered), TOKENIZE_BATCH):
        chunk = [r.segments() for r in rendered[start : start + TOKENIZE_BATCH]]
        texts = [text for segments in chunk for text, _learned in segments]
        pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
        for segments in chunk:
            ids: list[int] = []
            mask: list[bool] = []
            for _text, learned in segments:
                piece = next(pieces)
                ids += piece
                mask += [learned] * len(piece)
            ids += eos
            mask += [segments[-1][1]] * len(eos)
            if len(ids) >= max_length:  # the seed's rule: drop what reaches max_length
                dropped += 1
                continue
            input_ids.append(ids)
            labels.append(ids.copy() if train_on_inputs else
                          [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)])
    return {"input_ids": input_ids, "labels": labels}, dropped


def fingerprint(spec: TrainingSpec, tokenizer: Any, file_hashes: list[str]) -> str:
    """Key of the preprocessed-data cache: data, format, tokenizer and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    key = {
        "v": PREPROCESS_VERSION,
        "method": spec.method,  # each method lays its data out its own way
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


# Builds one file's data set: (path, spec, tokenizer, param, how tools are rendered) ->
# (data set, examples dropped).
Builder = Callable[[Path, TrainingSpec, Any, str, ToolFormat | None], tuple[Dataset, int]]


def _build(path: Path, spec: TrainingSpec, tokenizer: Any, param: str,
           tools_as: ToolFormat | None) -> tuple[Dataset, int]:
    rendered = render_file(path, spec, tokenizer, param, tools_as)
    columns, dropped = tokenize(rendered, tokenizer, spec.max_length, spec.train_on_inputs)
    return Dataset.from_dict(columns), dropped


def prepare(
    spec: TrainingSpec,
    tokenizer: Any,
    train_path: Path,
    train_hash: str,
    valid_path: Path | None = None,
    valid_hash: str | None = None,
    *,
    build: Builder = _build,
) -> Prepared:
    """Tokenized train (and validation) sets, from the cache when an attempt already built them.

    Args:
        build: how a file becomes a data set; the supervised layout (``input_ids``,
            ``labels``) unless a method brings its own.

    Raises:
        InvalidDataset: a bad record, or no example shorter than ``max_length``.
    """
    key = fingerprint(spec, tokenizer, [train_hash, valid_hash or ""])
    folder = storage.dataset_cache_key(train_hash, key)
    # The probe reads the chat template alone, which the cache key holds: the same answer.
    tools_as = tool_format(spec, tokenizer)
    cached = _load_cached(folder, tools_as)
    if cached is not None:
        return cached

    train, dropped = build(train_path, spec, tokenizer, "training_file", tools_as)
    if len(train) == 0:
        raise InvalidDataset(
            f"training_file: all {dropped} examples reach max_length={spec.max_length} tokens "
            "and were dropped; raise max_length or shorten the records",
            param="max_length",
        )
    valid = None
    if valid_path is not None:
        valid, _ = build(valid_path, spec, tokenizer, "validation_file", tools_as)
        if len(valid) == 0:
            raise InvalidDataset(
                f"validation_file: every example reaches max_length={spec.max_length}",
                param="validation_file",
            )
    meta = {"examples": len(train), "dropped": dropped,
            "validation": len(valid) if valid is not None else None}
    _store_cached(folder, train, valid, meta)
    return Prepared(train, valid, len(train), dropped, meta["validation"], False, tools_as)


def _load_cached(folder: str, tools_as: ToolFormat | None) -> Prepared | None:
    """The data sets an earlier attempt built with the same fingerprint, from storage."""
    try:
        local = storage.get_cache().folder(storage.get_store(), folder)
        meta = json.loads((local / "meta.json").read_text())
        train = load_from_disk(str(local / "train"))
        valid = load_from_disk(str(local / "validation")) if meta["validation"] else None
    except (ObjectMissing, DamagedFolder, StorageUnavailable, OSError, ValueError, KeyError):
        return None  # not built yet, or unreadable: build it (again)
    return Prepared(train, valid, meta["examples"], meta["dropped"], meta["validation"], True,
                    tools_as)


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
