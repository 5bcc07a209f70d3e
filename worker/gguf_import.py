"""Turning a GGUF file into a plain Hugging Face model folder that jobs can train on.

A GGUF holds a model's config, tokenizer, chat template and (usually quantized) weights in one
file. transformers reads it with ``from_pretrained(..., gguf_file=...)`` and dequantizes every
weight to float32, but the model it returns refuses ``save_pretrained`` (it still counts as
"quantized with gguf"). :func:`import_gguf` rebuilds the same architecture from the config without
that quantization entry, moves the dequantized weights in and saves an ordinary folder: config,
``model.safetensors`` (float32), tokenizer and chat template, which the worker and the engine load
like any other local model.

The folder appears whole or not at all: it is written into a hidden folder beside the target and
renamed last, and a manifest (:data:`MANIFEST`, the sha256 of the source GGUF and of every file
written) lets a later run check that a folder already there is complete and the same model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, cast

from shared.storage.folders import sha256_of

# GGUF ``general.architecture`` values this import converts. transformers dequantizes more, but
# these are the ones whose conversion the tests check weight by weight. "llama" also covers the
# files of Mistral, SmolLM, TinyLlama and other models llama.cpp writes with Llama's layout.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
MANIFEST = "lorafleet-import.json"
_PARTIAL = ".partial-"  # marks the hidden folder a conversion writes into, before its rename


class GgufImportError(Exception):
    """A GGUF that can't become a model folder; the message names the file and what to do."""


class NotAGguf(GgufImportError):
    """The file is not a GGUF, or not a whole one (truncated, damaged header)."""


class UnsupportedArchitecture(GgufImportError):
    """The GGUF is of an architecture this import does not convert."""


class FolderTaken(GgufImportError):
    """The target folder exists and is not this model's complete import."""


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF header says, read without touching the tensor data."""

    path: Path
    architecture: str
    name: str | None
    tensor_count: int
    quantization: list[str] = field(default_factory=list)  # ggml types of its tensors, sorted


@dataclass(frozen=True)
class Imported:
    """Where :func:`import_gguf` put the model; ``cached`` when the folder was already there."""

    path: Path
    cached: bool


# --------------------------------------------------------------------------- reading the header
class _Truncated(Exception):
    pass


class _Cursor:
    """Reads little-endian GGUF fields from a buffer; running past its end raises ``_Truncated``."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos])

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.unpack("Q")
        self.take(0)  # bounds-checks the position before the jump
        if self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n


def _value(cur: _Cursor, value_type: int) -> Any:
    """One metadata value: scalars and strings are returned, arrays skipped (their length)."""
    from gguf import GGUFValueType as T

    fixed: dict[int, str] = {
        T.UINT8: "B", T.INT8: "b", T.BOOL: "?", T.UINT16: "H", T.INT16: "h", T.UINT32: "I",
        T.INT32: "i", T.FLOAT32: "f", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
    if value_type in fixed:
        return cur.unpack(fixed[value_type])
    if value_type == T.STRING:
        return cur.string()
    if value_type == T.ARRAY:
        item_type, count = cur.unpack("I"), cur.unpack("Q")
        if item_type in fixed:
            cur.take(count * struct.calcsize(fixed[item_type]))
        else:  # strings (a vocabulary, merges) or nested arrays: walked one by one
            for _ in range(count):
                if item_type == T.STRING:
                    cur.skip_string()
                else:
                    _value(cur, item_type)
        return count
    raise ValueError(f"unknown metadata value type {value_type}")


def inspect_gguf(path: str | Path) -> GgufSummary:
    """Read a GGUF's header and tensor table, and check that the file holds all its tensor data.

    Fast (no tensor is read), so every import checks its file this way before converting.

    Raises:
        NotAGguf: the file is missing, is not a GGUF, or is shorter than its header says
            (a truncated download).
        UnsupportedArchitecture: its ``general.architecture`` is not in
            :data:`SUPPORTED_ARCHITECTURES`.
    """
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise NotAGguf(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise NotAGguf(f"{path} is empty, not a GGUF file: download it again")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            if cur.unpack("I") != GGUF_MAGIC:
                raise NotAGguf(f"{path} is not a GGUF file (it does not start with 'GGUF'): "
                               "give the .gguf file itself")
            version, tensor_count, kv_count = cur.unpack("I"), cur.unpack("Q"), cur.unpack("Q")
            if version < 2:
                raise NotAGguf(f"{path} is GGUF version {version}; convert it to version 3 with "
                               "a current llama.cpp first")
            meta: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cur.string()
                meta[key] = _value(cur, cur.unpack("I"))
            data_end = 0
            types: set[str] = set()
            for _ in range(tensor_count):
                tensor = cur.string()
                dims = [cur.unpack("Q") for _ in range(cur.unpack("I"))]
                type_id, offset = cur.unpack("I"), cur.unpack("Q")
                try:
                    ggml_type = GGMLQuantizationType(type_id)
                except ValueError:
                    raise NotAGguf(f"{path}: tensor '{tensor}' has ggml type {type_id}, which the "
                                   "installed gguf package does not know: upgrade gguf") from None
                block, block_bytes = GGML_QUANT_SIZES[ggml_type]
                types.add(ggml_type.name)
                data_end = max(data_end, offset + prod(dims) // block * block_bytes)
        except _Truncated:
            raise NotAGguf(f"{path} ends inside its header ({size} bytes): the file is truncated "
                           "or damaged; download it again") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise NotAGguf(f"{path} has a damaged header ({e}): download it again") from None
        alignment = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cur.pos // alignment) * alignment
    if tensor_count == 0:
        raise NotAGguf(f"{path} holds no tensors: it is not a model file")
    if size < data_start + data_end:
        raise NotAGguf(f"{path} is truncated: it has {size} bytes, its header describes "
                       f"{data_start + data_end}; download it again")
    architecture = str(meta.get("general.architecture", ""))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{path}: architecture '{architecture or '(none)'}' is not supported; import-gguf "
            f"converts {', '.join(SUPPORTED_ARCHITECTURES)} GGUF files (Llama, Mistral, SmolLM, "
            "TinyLlama, Qwen2, Qwen2.5, Qwen3)")
    name = meta.get("general.name")
    return GgufSummary(path, architecture, str(name) if name is not None else None,
                       tensor_count, sorted(types))


# --------------------------------------------------------------------------- the model folder
file_sha256 = sha256_of  # hex sha256 of a file, read in 1 MiB chunks


def folder_problem(folder: Path, source_sha256: str | None = None) -> str | None:
    """Why ``folder`` is not a complete import (of the GGUF with that sha256); ``None`` if it is.

    Checks the manifest's source and the sha256 of every file it lists.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files: dict[str, str] = manifest["files"]
        source = manifest["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no readable {MANIFEST} (it was not written by an import)"
    if source_sha256 is not None and source != source_sha256:
        return f"it was imported from another file (sha256 {source[:12]}...)"
    for name, sha in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != sha:
            return f"{name} differs from the one the import wrote"
    return None


def import_gguf(gguf_path: str | Path, target: str | Path, *, source: dict[str, str] | None = None,
                replace: bool = False) -> Imported:
    """Convert a GGUF into a Hugging Face model folder at ``target``, whole or not at all.

    A ``target`` that already holds a complete import of the same file is left as it is
    (``cached=True``). Otherwise the model is written into a hidden folder beside ``target`` and
    renamed to it last; a failure or an interrupt removes that folder, and a later run removes
    any left by a killed process.

    Args:
        gguf_path: the ``.gguf`` file.
        target: the folder to create, e.g. ``<models dir>/SmolLM2-135M-Instruct``.
        source: extra facts recorded in the manifest (where the file came from).
        replace: replace a ``target`` that exists but is not this import.

    Raises:
        NotAGguf, UnsupportedArchitecture: see :func:`inspect_gguf`.
        FolderTaken: ``target`` exists, is not this import, and ``replace`` is false.
        GgufImportError: transformers could not convert the file.
    """
    gguf_path, target = Path(gguf_path).resolve(), Path(target)
    summary = inspect_gguf(gguf_path)
    sha = file_sha256(gguf_path)
    _remove_stale_partials(target)
    # An empty folder of that name (made ahead by hand) is simply replaced by the rename.
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        problem = folder_problem(target, sha)
        if problem is None:
            return Imported(target, cached=True)
        if not replace:
            raise FolderTaken(f"{target} already exists and is not this import of {gguf_path} "
                              f"({problem}): move it away, choose another name, or replace it "
                              "with --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _partial_folder(target) as partial:
        _convert(summary, partial)
        _write_manifest(partial, {"file": gguf_path.name, "sha256": sha,
                                  "architecture": summary.architecture,
                                  "quantization": ",".join(summary.quantization),
                                  **(source or {})})
        if replace and target.exists() and any(target.iterdir()):
            _swap(partial, target)
        else:
            try:
                partial.rename(target)
            except OSError:
                # Another import of the same model finished first: keep it if it is whole.
                if folder_problem(target, sha) is None:
                    return Imported(target, cached=True)
                raise
    return Imported(target, cached=False)


def _convert(summary: GgufSummary, out: Path) -> None:
    """Dequantize ``summary.path`` with transformers and save it as a plain folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = summary.path
    # from_pretrained(folder, gguf_file=...) also reads other files of that folder (a stray
    # tokenizer_config.json would win over the GGUF's), so it gets a folder of its own.
    with tempfile.TemporaryDirectory(prefix="lorafleet-gguf-") as tmp:
        (Path(tmp) / path.name).symlink_to(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name,
                                                      trust_remote_code=False)
            loaded, info = cast(tuple[Any, dict[str, Any]], AutoModelForCausalLM.from_pretrained(
                tmp, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False,
                output_loading_info=True))
        except Exception as e:  # noqa: BLE001 - anything transformers raises is about this file
            raise GgufImportError(f"{path}: transformers could not read it ({e}); check that "
                                  "it is a complete GGUF of a supported architecture") from e
    missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight"]
    if missing:
        raise GgufImportError(f"{path}: {len(missing)} weights are not in the file "
                              f"(e.g. {missing[0]}): its tensor layout is not one transformers "
                              "reads")
    config = copy.deepcopy(loaded.config)
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    # The same architecture without the GGUF quantizer attached: built empty, then it takes over
    # the dequantized tensors instead of copying them.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise GgufImportError(f"{path}: weight {bad[0]} is not finite after dequantizing: the "
                              "file is damaged; download it again")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(folder: Path, source: dict[str, str]) -> None:
    files = {}
    for file in sorted(folder.iterdir()):
        file.chmod(0o644)  # safetensors writes 0600; workers may run as another user
        files[file.name] = file_sha256(file)
    text = json.dumps({"source": source, "dtype": "float32", "files": files}, indent=2)
    (folder / MANIFEST).write_text(text + "\n", encoding="utf-8")


@contextlib.contextmanager
def _partial_folder(target: Path) -> Iterator[Path]:
    """A hidden folder beside ``target``, removed unless it was renamed into place."""
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}{os.getpid()}-",
                                    dir=target.parent))
    partial.chmod(0o755)
    try:
        yield partial
    finally:  # also on KeyboardInterrupt: nothing half-written stays behind
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    """Put ``new`` in the place of the existing ``target``, then delete the old one."""
    old = target.with_name(f".{target.name}{_PARTIAL}{os.getpid()}-old")
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(target: Path) -> None:
    """Remove the hidden folders that imports into ``target`` killed mid-way left behind."""
    if not target.parent.is_dir():
        return
    for stale in target.parent.glob(f".{target.name}{_PARTIAL}*"):
        pid = stale.name.removeprefix(f".{target.name}{_PARTIAL}").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
