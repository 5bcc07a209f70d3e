"""Tiny GGUF files written offline, for the GGUF import tests.

:func:`write_tiny_gguf` builds a small random-init Llama (or Qwen2, Qwen3) model with the tiny
tokenizer of :mod:`worker.tiny_model`, and writes it as llama.cpp's converter would: llama.cpp
tensor names, Llama's query and key rows permuted into its rotary layout, the tokenizer as
``gpt2`` metadata. So an import that gets names, permutation or tokenizer wrong gives other
weights or other token ids than the model it started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

VOCAB_SIZE = 320


@dataclass
class TinyGguf:
    """A written GGUF and the Hugging Face model and tokenizer it was written from."""

    path: Path
    model: Any  # LlamaForCausalLM
    tokenizer: Any  # PreTrainedTokenizerFast


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for query and key rows (convert_hf_to_gguf's ``permute``)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(
    path: Path, *, architecture: str = "llama",
    quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tie_word_embeddings: bool = True, seed: int = 0,
) -> TinyGguf:
    """Write a tiny model (2 layers, width 64, grouped-query attention) as a GGUF at ``path``.

    ``architecture`` is ``llama``, ``qwen2`` or ``qwen3``; ``quantization`` applies to the 2-D
    weights (as in a real Q4_1 file), norms and biases stay F32.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

    tokenizer = build_tokenizer(vocab_size=VOCAB_SIZE)
    n_head, n_kv = 4, 2
    # transformers reads no head size from a Qwen3 GGUF and takes Qwen3's 128.
    head_dim = 128 if architecture == "qwen3" else 64 // n_head
    config = AutoConfig.for_model(
        architecture, head_dim=head_dim,
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # norms away from 1.0, so a norm loaded wrong shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokenizer))

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2" if architecture == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS
                            else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3}[architecture]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a tied model's file has no output.weight
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = tensor.numpy().astype(np.float32)
        if architecture == "llama" and name.endswith("attn_q.weight"):
            data = _permute(data, n_head)
        elif architecture == "llama" and name.endswith("attn_k.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(data, quantization),
                              raw_dtype=quantization)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGguf(Path(path), model, tokenizer)


def write_gguf_of_architecture(path: Path, architecture: str) -> Path:
    """A small, complete GGUF whose ``general.architecture`` is ``architecture`` (one tensor)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
