"""Packing and loss masking: a packed batch trains exactly what its samples would alone.

A packed row lays a batch's samples end to end; attention must stay within each sample, and
the loss of the row must be the token-weighted mean of the samples' own losses (each sample's
loss is a mean over its predicted tokens, so samples weigh by how many they have).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from shared.records import DEFAULT_INSTRUCTION  # noqa: E402
from shared.schemas import LoraSpec, TrainingSpec  # noqa: E402
from shared.templates import PromptFormat, Rendered  # noqa: E402
from tests.support.jobs import dialogsum_records, jsonl_bytes  # noqa: E402
from worker.attention import PACKED_SDPA, use_packed_attention  # noqa: E402
from worker.collate import PackedCollator, make_collator  # noqa: E402
from worker.preprocess import IGNORE_INDEX, tokenize  # noqa: E402

# (length, prompt length): different lengths, so a sample that saw its neighbours would show.
SHAPES = [(9, 4), (23, 10), (6, 2), (31, 12), (14, 5)]


def spec(**overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "model": "tiny", "training_file": "file-x", "lora": LoraSpec(),
        "prompt_format": PromptFormat(type="dolly", instruction=DEFAULT_INSTRUCTION),
        "max_length": 1024, "n_epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-4, "warmup": 0, "save_steps": 100, "logging_steps": 1,
        "train_on_inputs": False, "packing": True, "seed": 0,
    }
    return TrainingSpec(**{**values, **overrides})


def features(vocab: int, train_on_inputs: bool = False) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in SHAPES:
        ids = torch.randint(4, vocab, (length,), generator=gen).tolist()
        labels = ids.copy() if train_on_inputs else [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def load(tiny_model: Path, attention: str) -> Any:
    """The tiny model set up as ``worker.training.model.load_model`` sets it up for training."""
    from transformers import AutoModelForCausalLM

    impl = "eager" if attention == "eager" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=impl)
    model.config.use_cache = False
    if attention == "packed":
        assert use_packed_attention(model)
        assert model.config._attn_implementation == PACKED_SDPA
    return model.eval()


def alone(model: Any, feats: list[dict[str, list[int]]]) -> tuple[Any, int]:
    """Token-weighted mean of each sample's loss, each run alone; and the token count."""
    total, count = torch.zeros(()), 0
    for f in feats:
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        n = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
        total = total + model(input_ids=ids, labels=labels).loss * n
        count += n
    return total / count, count


def batch_loss(model: Any, batch: dict[str, Any]) -> Any:
    targets = batch["shift_labels"] if "shift_labels" in batch else batch["labels"][:, 1:]
    return model(**batch, num_items_in_batch=targets.ne(IGNORE_INDEX).sum()).loss


# "packed": lorafleet's per-sample attention (the default with packing); "sdpa" and "eager":
# transformers' own mask for packed rows, which needs the KV cache off (as training sets it).
@pytest.mark.parametrize("attention", ["packed", "sdpa", "eager"])
@pytest.mark.parametrize("loss_only_where_labeled", [True, False])
def test_packed_loss_is_the_token_weighted_mean_of_the_samples_alone(
    tiny_model: Path, attention: str, loss_only_where_labeled: bool
) -> None:
    model = load(tiny_model, attention)
    feats = features(model.config.vocab_size)
    batch = PackedCollator(loss_only_where_labeled=loss_only_where_labeled)(feats)

    with torch.no_grad():
        packed = batch_loss(model, batch)
        expected, count = alone(model, feats)

    assert batch["input_ids"].shape == (1, sum(n for n, _ in SHAPES))
    assert count == sum(n - p for n, p in SHAPES)  # response tokens; none across a boundary
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_packed_gradients_match_the_padded_batch(tiny_model: Path, tiny_tokenizer: Any) -> None:
    """The LoRA gradients of a packed row equal those of the same samples padded."""
    from peft import LoraConfig, get_peft_model

    grads = {}
    for name, packing in (("packed", True), ("padded", False)):
        model = load(tiny_model, "packed" if packing else "sdpa")
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "fc1"],
                                                 init_lora_weights=False))
        feats = features(model.config.vocab_size)
        batch = make_collator(tiny_tokenizer, packing=packing)(feats)
        batch_loss(model, batch).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.requires_grad}
    assert grads["packed"].keys() == grads["padded"].keys() and grads["packed"]
    for key, value in grads["packed"].items():
        torch.testing.assert_close(value, grads["padded"][key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [True, False])
def test_lm_head_only_on_labeled_positions_changes_nothing(tiny_model: Path,
                                                           tiny_tokenizer: Any,
                                                           packing: bool) -> None:
    model = load(tiny_model, "packed" if packing else "sdpa")
    feats = features(model.config.vocab_size)
    with torch.no_grad():
        narrow = make_collator(tiny_tokenizer, packing=packing)(feats)
        wide = make_collator(tiny_tokenizer, packing=packing, loss_only_where_labeled=False)(feats)
        out = model(**narrow)
        assert out.logits.shape[-2] == narrow["shift_labels"].numel()  # only labeled rows
        torch.testing.assert_close(batch_loss(model, narrow), batch_loss(model, wide),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_loss_masking_follows_train_on_inputs(tiny_tokenizer: Any,
                                              train_on_inputs: bool) -> None:
    rendered = [Rendered("Instruct: say hello\nOutput:", " Hello there."),
                Rendered("Instruct: count\nOutput:", " One, two, three.")]
    columns, _ = tokenize(rendered, tiny_tokenizer, 1024, train_on_inputs)
    feats = [{"input_ids": i, "labels": lab}
             for i, lab in zip(columns["input_ids"], columns["labels"], strict=True)]

    batch = PackedCollator()(feats)

    expected: list[int] = []  # what each sample's tokens after the first should predict
    for r, ids in zip(rendered, columns["input_ids"], strict=True):
        prompt = len(tiny_tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
        assert ids[-1] == tiny_tokenizer.eos_token_id
        expected += ids[1:] if train_on_inputs else ids[prompt:]
    assert batch["shift_labels"].tolist() == expected
    # Never a target across the boundary: the first token of each sample is nobody's target.
    second_start = len(columns["input_ids"][0])
    assert batch["labels"][0, second_start] == IGNORE_INDEX


def test_a_job_trains_packed_by_default_and_counts_every_token(
    settings_env: Callable[..., Any], tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job path (prepare → train_adapter) with JobCreate's defaults packs, switches the
    attention to per-sample, turns the KV cache off, and counts each real token once."""
    from shared.schemas import JobCreate
    from worker.preprocess import prepare
    from worker.training import supervised, trainer

    settings_env()
    defaults = JobCreate(model="org/m", training_file="file-x")
    assert defaults.packing is True and defaults.train_on_inputs is False
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl_bytes(dialogsum_records(8)))
    job = spec(model=str(tiny_model), max_steps=2, batch_size=4, packing=defaults.packing)
    data = prepare(job, tiny_tokenizer, path, hashlib.sha256(path.read_bytes()).hexdigest())
    seen: dict[str, Any] = {}
    real_load = supervised.load_model

    def spy(spec_: TrainingSpec, device: str) -> Any:
        model, trainable, total = real_load(spec_, device)
        seen["attention"] = model.config._attn_implementation
        seen["use_cache"] = model.config.use_cache
        return model, trainable, total

    monkeypatch.setattr(supervised, "load_model", spy)
    result = trainer.train_adapter(job, tiny_tokenizer, data, tmp_path / "ckpt",
                                   tmp_path / "adapter", device="cpu")

    assert seen == {"attention": PACKED_SDPA, "use_cache": False}
    assert result.step == 2 and result.adapter_dir is not None
    # 2 steps x 4 examples = the whole file once; eos tokens count (pad != eos here).
    assert result.trained_tokens == sum(len(ids) for ids in data.train["input_ids"])
    assert result.train_seconds > 0


def test_sliding_window_models_keep_transformers_attention_and_stay_exact() -> None:
    """Per-sample SDPA knows no sliding window: such a model is not switched, and packing
    stays exact through transformers' own packed-row mask."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=5, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()

    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"
    feats = features(config.vocab_size)
    with torch.no_grad():
        packed = batch_loss(model, PackedCollator()(feats))
        expected, _ = alone(model, feats)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_packs_exactly() -> None:
    """Per-sample SDPA with fewer key/value heads than query heads (Llama-style GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()

    assert use_packed_attention(model)
    feats = features(config.vocab_size)
    with torch.no_grad():
        packed = batch_loss(model, PackedCollator()(feats))
        expected, _ = alone(model, feats)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_a_packed_row_without_host_bounds_stays_exact(tiny_model: Path) -> None:
    """A packed row built without the collator (``cu_seq_lens_q`` alone) still attends within
    each sample: the attention reads the tensor back instead."""
    from worker.attention import SAMPLE_BOUNDS

    model = load(tiny_model, "packed")
    feats = features(model.config.vocab_size)
    batch = PackedCollator()(feats)
    del batch[SAMPLE_BOUNDS]
    with torch.no_grad():
        packed = batch_loss(model, batch)
        expected, _ = alone(model, feats)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_padded_batches_stay_exact_where_transformers_takes_no_boolean_mask(
    tiny_model: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older transformers 5 releases slice ``logits_to_keep`` by 1-D indices only: the padded
    collator then keeps the positions labeled in any row, with the same loss."""
    from worker import collate

    model = load(tiny_model, "sdpa")
    feats = features(model.config.vocab_size)
    monkeypatch.setattr(collate, "BOOLEAN_LOGITS_TO_KEEP", False)
    narrow = make_collator(tiny_tokenizer, packing=False)(feats)
    assert narrow["logits_to_keep"].dim() == 1 and narrow["shift_labels"].dim() == 2
    wide = make_collator(tiny_tokenizer, packing=False, loss_only_where_labeled=False)(feats)
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(model, narrow), batch_loss(model, wide),
                                   rtol=1e-5, atol=1e-6)


def _small(arch: str) -> Any:
    """A small model in training setup on the meta device (shapes only, no values)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    from worker.last_layer import run_last_layer_on_loss_positions

    sizes = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 3, "num_attention_heads": 4, "use_cache": False,
             "attn_implementation": "sdpa"}
    with torch.device("meta"):
        if arch == "phi":
            model = PhiForCausalLM(PhiConfig(**sizes))
        else:  # grouped-query attention
            model = LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=2))
    assert use_packed_attention(model)
    if arch == "phi":
        assert run_last_layer_on_loss_positions(model)
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("arch", ["phi", "llama"])
def test_the_training_step_never_reads_the_row_layout_back_from_the_device(
    arch: str, checkpointing: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample boundaries and labeled positions reach attention and the last layer as
    host ints. The whole step (forward, loss, backward, and the recompute under activation
    checkpointing) runs here on the meta device, where every read of a tensor's values
    (``.tolist()``, ``.item()``, ``int()``, ``nonzero``, a boolean index) raises: on a GPU each
    would be a GPU→CPU round trip."""
    from peft import LoraConfig, get_peft_model

    model = _small(arch)
    if checkpointing:
        kwargs = {"use_reentrant": False}  # non-reentrant, as the trainer sets it
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # the older name
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    feats = features(model.config.vocab_size)
    batch = make_collator(None, packing=True, last_layer=arch == "phi")(feats)
    on_device = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with pytest.raises(NotImplementedError):  # reading the boundaries back fails here
        on_device["cu_seq_lens_q"].tolist()

    queries: list[int] = []  # query lengths of the attention calls: per sample, not per row
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: Any, *args: Any, **kwargs: Any) -> Any:
        queries.append(query.shape[-2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    targets = on_device["shift_labels"].ne(IGNORE_INDEX).sum()
    loss = model(**on_device, num_items_in_batch=targets).loss
    forward, samples = list(queries), [n for n, _ in SHAPES]
    loss.backward()

    assert loss.device.type == "meta"
    assert forward[:2 * len(samples)] == samples * 2  # the first two layers, sample by sample
    if arch == "phi":  # the last layer: only each sample's labeled positions ask
        assert forward[2 * len(samples):] == [n - p for n, p in SHAPES]
    if checkpointing:  # the backward recomputed the layers, the first two last, per sample
        assert queries[-2 * len(samples):] == samples * 2 and len(queries) > len(forward)
