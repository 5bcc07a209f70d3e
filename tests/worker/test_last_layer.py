"""The last layer run on the loss positions only trains exactly what the full layer does."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from worker.attention import use_packed_attention  # noqa: E402
from worker.collate import PackedCollator  # noqa: E402
from worker.last_layer import (  # noqa: E402
    LOSS_POSITIONS,
    is_patched,
    run_last_layer_on_loss_positions,
)
from worker.preprocess import IGNORE_INDEX  # noqa: E402

# (length, prompt length); the 3rd is all prompt and the 5th has a single response token, so
# a sample without queries and a one-query sample both occur.
SHAPES = [(19, 8), (33, 21), (12, 12), (41, 17), (9, 8)]


def phi(**config: Any) -> Any:
    """A small random-init Phi in training setup: KV cache off, per-sample attention."""
    from transformers import PhiConfig, PhiForCausalLM

    values = {"vocab_size": 211, "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 128,
              "attn_implementation": "sdpa", **config}
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**values))
    model.config.use_cache = False
    assert use_packed_attention(model)
    return model


def features(vocab: int, shapes: list[tuple[int, int]] = SHAPES) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in shapes:
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any], int]:
    """Loss and LoRA gradients of one batch, and how many rows the last MLP saw."""
    from peft import LoraConfig, get_peft_model

    rows: list[int] = []
    model.model.layers[-1].mlp.fc2.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[1]))
    torch.manual_seed(2)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]))
    loss = peft_model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, rows[0]


@pytest.mark.parametrize("config", [
    {},
    # grouped-query attention, normed queries and keys, a different rotary share
    {"num_key_value_heads": 2, "qk_layernorm": True, "partial_rotary_factor": 0.4},
], ids=["phi", "gqa-qk-norm"])
def test_loss_and_lora_gradients_equal_the_full_layer(config: dict[str, Any]) -> None:
    full_model = phi(**config)
    patched_model = phi(**config)
    assert run_last_layer_on_loss_positions(patched_model) and is_patched(patched_model)
    assert not is_patched(full_model)
    feats = features(full_model.config.vocab_size)

    full_loss, full_grads, full_rows = loss_and_grads(full_model, PackedCollator()(feats))
    batch = PackedCollator(last_layer=True)(feats)
    labeled = int(batch[LOSS_POSITIONS].sum())
    loss, grads, rows = loss_and_grads(patched_model, batch)

    # through the peft wrapper, the last layer ran on the labeled positions alone
    assert rows == labeled < full_rows / 2 and full_rows == batch["input_ids"].shape[1]

    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys() and len(grads) == 3 * 6 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_last_layer_computes_fewer_rows() -> None:
    """The saving is real: the last MLP sees only the labeled positions."""
    model = phi()
    run_last_layer_on_loss_positions(model)
    batch = PackedCollator(last_layer=True)(features(model.config.vocab_size))
    rows: dict[str, int] = {}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.fc1.register_forward_hook(
            lambda _m, args, _out, i=index: rows.__setitem__(f"layer{i}", args[0].shape[1]))
    with torch.no_grad():
        model(**batch)
    total = batch["input_ids"].shape[1]
    assert rows["layer0"] == rows["layer1"] == total
    assert rows["layer2"] == int(batch[LOSS_POSITIONS].sum()) < total / 2


def test_without_loss_positions_the_layer_runs_whole() -> None:
    """Generation and unpacked batches carry no ``loss_positions``: the output is unchanged."""
    plain, patched = phi(), phi()
    run_last_layer_on_loss_positions(patched)
    ids = torch.randint(0, 211, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_other_architectures_are_left_alone() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4))
    assert not run_last_layer_on_loss_positions(model) and not is_patched(model)
