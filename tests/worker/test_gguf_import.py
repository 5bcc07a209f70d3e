"""GGUF → Hugging Face folder: the weights, tokenizer and chat template survive the conversion,
bad files fail at once with a message naming them, and the folder appears whole or not at all."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.tiny_gguf import TinyGguf, write_gguf_of_architecture, write_tiny_gguf
from worker import gguf_import
from worker.gguf_import import (
    MANIFEST,
    FolderTaken,
    GgufImportError,
    NotAGguf,
    UnsupportedArchitecture,
    folder_problem,
    import_gguf,
    inspect_gguf,
)

TEXT = "#Person1#: Hi, how are you doing today?\n#Person2#: Fine, thanks. <|im_end|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGguf:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def leftovers(models: Path) -> list[str]:
    """What a models folder holds, hidden folders included."""
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --------------------------------------------------------------------------- conversion
@pytest.mark.parametrize(("architecture", "model_class"), [
    ("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
def test_import_gives_the_same_weights_tokenizer_and_template(
    tmp_path: Path, architecture: str, model_class: str
) -> None:
    tiny = write_tiny_gguf(tmp_path / f"{architecture}.gguf", architecture=architecture)
    result = import_gguf(tiny.path, tmp_path / "models" / "tiny")

    assert result.cached is False
    model = AutoModelForCausalLM.from_pretrained(result.path)
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    assert type(model).__name__ == model_class
    assert model.config.tie_word_embeddings is True
    expected, got = tiny.model.state_dict(), model.state_dict()
    assert sorted(got) == sorted(expected)
    # F32 in the file: exact, so a wrong permutation or a swapped tensor cannot hide.
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert tokenizer(TEXT).input_ids == tiny.tokenizer(TEXT).input_ids
    assert tokenizer.chat_template == tiny.tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|pad|>")
    ids = torch.tensor([tiny.tokenizer(TEXT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny.model(ids).logits)
    # An ordinary folder: no quantization entry that would stop save_pretrained or the worker.
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    manifest = json.loads((result.path / MANIFEST).read_text())
    assert manifest["source"]["architecture"] == architecture
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert all((result.path / f).stat().st_mode & 0o777 == 0o644 for f in manifest["files"])
    assert leftovers(tmp_path / "models") == ["tiny"]


def test_untied_output_weights_are_kept(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "untied.gguf", tie_word_embeddings=False, seed=1)
    model = AutoModelForCausalLM.from_pretrained(
        import_gguf(tiny.path, tmp_path / "models" / "untied").path)

    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, tiny.model.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_q4_1_weights_are_dequantized_within_one_quantization_step(tmp_path: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "q4.gguf", quantization=gguf.GGMLQuantizationType.Q4_1)
    assert inspect_gguf(tiny.path).quantization == ["F32", "Q4_1"]
    model = AutoModelForCausalLM.from_pretrained(
        import_gguf(tiny.path, tmp_path / "models" / "q4").path)

    for name, want in tiny.model.state_dict().items():
        got = model.state_dict()[name]
        # Q4_1 stores 16 levels between each 32-value block's min and max.
        step = float(want.max() - want.min()) / 15
        assert float((got - want).abs().max()) <= step / 2 + 1e-3, name
    assert model.config.model_type == "llama"


def test_a_second_import_of_the_same_file_is_cached(tiny: TinyGguf, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    import_gguf(tiny.path, target)
    weights = target / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    again = import_gguf(tiny.path, target)

    assert again.cached is True and again.path == target
    assert weights.stat().st_mtime_ns == mtime


def test_a_folder_that_changed_is_not_taken_for_the_import(tiny: TinyGguf,
                                                           tmp_path: Path) -> None:
    target = import_gguf(tiny.path, tmp_path / "models" / "tiny").path
    (target / "config.json").write_text("{}")

    assert folder_problem(target) == "config.json differs from the one the import wrote"
    with pytest.raises(FolderTaken, match=r"tiny already exists .* --force"):
        import_gguf(tiny.path, target)
    assert import_gguf(tiny.path, target, replace=True).cached is False
    assert folder_problem(target) is None
    assert leftovers(tmp_path / "models") == ["tiny"]


def test_a_folder_of_the_same_name_is_not_overwritten(tiny: TinyGguf, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("keep me")

    with pytest.raises(FolderTaken, match=f"{target} already exists"):
        import_gguf(tiny.path, target)
    assert (target / "mine.txt").read_text() == "keep me"

    (target / "mine.txt").unlink()  # an empty folder made ahead is just filled
    assert import_gguf(tiny.path, target).cached is False
    assert folder_problem(target) is None


# --------------------------------------------------------------------------- bad files
def test_truncated_file_is_refused_before_converting(tiny: TinyGguf, tmp_path: Path) -> None:
    data = tiny.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])

    with pytest.raises(NotAGguf) as e:
        import_gguf(cut, tmp_path / "models" / "cut")

    msg = str(e.value)
    assert msg.startswith(f"{cut} is truncated: it has {cut.stat().st_size} bytes")
    assert "download it again" in msg and "\n" not in msg
    assert leftovers(tmp_path / "models") == []


@pytest.mark.parametrize("keep", [0, 3, 10, 200])
def test_file_cut_inside_its_header_is_refused(tiny: TinyGguf, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "head.gguf"
    cut.write_bytes(tiny.path.read_bytes()[:keep])

    with pytest.raises(NotAGguf, match=f"^{cut} .*(empty|truncated).*download it again$"):
        inspect_gguf(cut)


def test_a_file_that_is_not_a_gguf_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("<html>404 Not Found</html>" * 4)

    with pytest.raises(NotAGguf, match=f"^{text} is not a GGUF file"):
        inspect_gguf(text)
    with pytest.raises(NotAGguf, match="no such file"):
        inspect_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("architecture", ["bert", "mamba", "gemma2"])
def test_unsupported_architecture_is_refused_naming_file_and_architecture(
    tmp_path: Path, architecture: str
) -> None:
    path = write_gguf_of_architecture(tmp_path / f"{architecture}.gguf", architecture)

    with pytest.raises(UnsupportedArchitecture) as e:
        import_gguf(path, tmp_path / "models" / architecture)

    assert str(e.value).startswith(f"{path}: architecture '{architecture}' is not supported")
    assert "llama" in str(e.value)
    assert leftovers(tmp_path / "models") == []


def test_non_finite_weights_are_refused(tiny: TinyGguf, tmp_path: Path) -> None:
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(tiny.path.read_bytes())
    tensor = next(t for t in gguf.GGUFReader(bad).tensors if t.name == "blk.0.ffn_up.weight")
    with bad.open("r+b") as fh:
        fh.seek(tensor.data_offset)
        fh.write(struct.pack("<f", float("nan")))

    with pytest.raises(GgufImportError, match=r"up_proj\.weight is not finite .* damaged"):
        import_gguf(bad, tmp_path / "models" / "nan")
    assert leftovers(tmp_path / "models") == []


# --------------------------------------------------------------------------- whole or nothing
def test_failure_after_the_weights_are_written_leaves_nothing(
    tiny: TinyGguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(folder: Path, source: dict[str, str]) -> None:
        assert (folder / "model.safetensors").is_file()  # mid-way: the weights are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_import, "_write_manifest", disk_full)
    with pytest.raises(OSError, match="No space left"):
        import_gguf(tiny.path, tmp_path / "models" / "tiny")
    assert leftovers(tmp_path / "models") == []


def test_interrupt_leaves_nothing(tiny: TinyGguf, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(summary: object, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny.path, tmp_path / "models" / "tiny")
    assert leftovers(tmp_path / "models") == []


def test_folders_left_by_a_killed_import_are_removed(tiny: TinyGguf, tmp_path: Path) -> None:
    models = tmp_path / "models"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = models / f".tiny.partial-{dead.stdout.strip()}-abc"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    running = models / f".tiny.partial-{os.getpid()}-xyz"  # an import still running
    running.mkdir()

    import_gguf(tiny.path, models / "tiny")

    assert leftovers(models) == [running.name, "tiny"]
