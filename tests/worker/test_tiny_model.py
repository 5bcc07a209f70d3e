"""Tests for ``worker.tiny_model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from worker.tiny_model import IM_END, IM_START, build_tiny_model  # noqa: E402

DIALOGUE = (
    "#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins. Why are you here today?\n"
    "#Person2#: I found it would be a good idea to get a check-up.\n"
    "#Person1#: Yes, well, you haven't had one for 5 years — café, naïve, 100%!"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default build shared by the read-only tests (building is cheap, loading less so)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _tensors(path: Path) -> dict:
    return safetensors_torch.load_file(path / "model.safetensors")


# --- build and load --------------------------------------------------------------------------


def test_build_returns_path_with_checkpoint_files(tiny_dir: Path) -> None:
    assert isinstance(tiny_dir, Path)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name


def test_loads_back_with_auto_classes(tiny_dir: Path, tokenizer, model) -> None:
    assert type(model).__name__ == "PhiForCausalLM"
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    config = model.config
    # 4 heads of 32: the narrowest that vLLM's CPU attention serves.
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 2, 4)
    assert config.intermediate_size == 256
    assert config.max_position_embeddings == tokenizer.model_max_length == 1024
    assert config.vocab_size == len(tokenizer) == 2048
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    # Tiny, so tests that train it stay fast.
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_tokenizer_round_trips_dialogsum_text(tokenizer) -> None:
    ids = tokenizer(DIALOGUE)["input_ids"]
    assert tokenizer.decode(ids) == DIALOGUE
    # No bos/eos added behind the caller's back: training code decides about those.
    assert tokenizer.eos_token_id not in ids
    # Trained on dialogues, so the text compresses well below one token per byte.
    assert len(ids) < len(DIALOGUE.encode()) / 2


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for token in ("<|endoftext|>", "<|pad|>", IM_START, IM_END):
        assert token in tokenizer.all_special_tokens
        # Each special token is one id, also in running text.
        assert len(tokenizer(f"a{token}b")["input_ids"]) == 3
    ids = tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Summarize the dialogue."},
        {"role": "user", "content": "#Person1#: Hi.\n#Person2#: Hello."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nSummarize the dialogue.<|im_end|>\n"
        "<|im_start|>user\n#Person1#: Hi.\n#Person2#: Hello.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert rendered.startswith(without) and not without.endswith("assistant\n")


def test_forward_logits_shape(tokenizer, model) -> None:
    enc = tokenizer(DIALOGUE, return_tensors="pt")
    seq = enc["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, seq, len(tokenizer))
    assert torch.isfinite(logits).all()


def test_generates_a_few_tokens(tokenizer, model) -> None:
    enc = tokenizer("Instruct: Summarize the below conversation.\nOutput:", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)
    assert torch.equal(out[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_identical_files(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert (again / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    first, second = _tensors(tiny_dir), _tensors(again)
    assert first.keys() == second.keys() and len(first) > 0
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_different_seed_gives_different_weights(tmp_path: Path, tiny_dir: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=1)
    # The tokenizer doesn't depend on the seed; the random weights do.
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    first, second = _tensors(tiny_dir), _tensors(other)
    assert first.keys() == second.keys()
    assert not torch.equal(first["model.embed_tokens.weight"], second["model.embed_tokens.weight"])


def test_build_leaves_global_torch_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_custom_corpus_and_sizes(tmp_path: Path) -> None:
    corpus = ["#Person1#: How much is this lamp?\n#Person2#: Twenty dollars."] * 20
    path = build_tiny_model(
        tmp_path / "small",
        corpus=corpus,
        vocab_size=300,
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    tok = transformers.AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == len(tok) <= 300
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert tok.model_max_length == 128
    assert tok.decode(tok(corpus[0])["input_ids"]) == corpus[0]


def test_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tmp_path / "x", hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tmp_path / "y", vocab_size=100)

