"""Build a tiny, random-init Phi model with its own BPE tokenizer, entirely offline.

Tests and demos need a real ``transformers`` checkpoint that loads with the Auto classes, trains
in seconds on a CPU and never touches the Hugging Face Hub. :func:`build_tiny_model` makes one:
a byte-level BPE tokenizer trained on the bundled DialogSum-style sample (GPT-2/Phi-2 style
special tokens plus a ChatML chat template) and a ``PhiForCausalLM`` with under a million
parameters. Everything is seeded, so the same arguments always give the same files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: <|endoftext|> = 0, <|pad|> = 1, <|im_start|> = 2, <|im_end|> = 3.
SPECIAL_TOKENS = [ENDOFTEXT, PAD, IM_START, IM_END]

# The prompt formats the worker renders (Alpaca-style and the short "Instruct:/Output:" one);
# trained into the vocabulary so that prompts tokenize into few, stable pieces.
PROMPT_STRINGS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruct:",
    "### Output:",
    "### End",
    "Instruct:",
    "Output:",
    "Summarize the below conversation.",
]
_PROMPT_REPEATS = 64

# ChatML, and tools as Hermes-style templates (Qwen 2.5's, SmolLM3's) show them: their
# signatures in a system turn, calls in <tool_call> blocks, results in <tool_response> ones.
# A conversation without tools renders as plain ChatML.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:"
    "\\n<tools>' }}{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and "
    "arguments within <tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\\n' + ({'name': "
    "call['function']['name'], 'arguments': call['function']['arguments']} | tojson) + "
    "'\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _sample_texts() -> Iterator[str]:
    """Yield the dialogue and summary of every record of the bundled sample, in file order."""
    from shared.samples import SAMPLE_PATH

    with SAMPLE_PATH.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                yield record["dialogue"]
                yield record["summary"]


def build_tokenizer(
    corpus: Iterable[str] | None = None, *, vocab_size: int = 2048, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a ``transformers`` fast tokenizer.

    Args:
        corpus: training texts; default: the bundled sample's dialogues and summaries plus
            :data:`PROMPT_STRINGS`.
        vocab_size: target vocabulary size, special tokens included (a small corpus may yield
            fewer tokens).
        model_max_length: the tokenizer's ``model_max_length``.

    Returns:
        A ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5).

    Raises:
        ValueError: ``vocab_size`` can't hold the 256 byte symbols plus the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}")
    if corpus is None:
        # The prompt strings appear in every training example, so weigh them like that: they then
        # get merged into a few tokens each instead of being spelled out from short pieces.
        texts = [*_sample_texts(), *PROMPT_STRINGS * _PROMPT_REPEATS]
    else:
        texts = list(corpus)

    backend = Tokenizer(models.BPE())
    # GPT-2 / Phi-2 layout: no prefix space, so "Hi" at the start of a text stays one token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # A post-processor that adds nothing: an unset one would let transformers install its own
    # bos/eos template, and training code decides about bos/eos itself.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The trainer breaks count ties by pair ids, so the same texts give the same merges.
    backend.train_from_iterator(texts, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        # A pad distinct from eos: padding masked out of the loss must not mask the real eos.
        pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    path: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Build a tiny random-init ``PhiForCausalLM`` and its tokenizer, and save both to ``path``.

    The folder then loads with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``. Same arguments, same files: the tokenizer training
    is deterministic and the weights come from ``torch.manual_seed(seed)`` (in a forked RNG, so
    the caller's global torch RNG state is left as it was).

    Args:
        path: output folder; created if missing, existing files of the same names overwritten.
        corpus: tokenizer training texts; default: the bundled DialogSum-style sample plus the
            prompt-format strings (:data:`PROMPT_STRINGS`).
        vocab_size: target tokenizer vocabulary; the model's vocabulary is the trained size.
        hidden_size: model width; must be divisible by ``num_attention_heads``. The default
            gives heads of 32, the smallest that vLLM's CPU attention serves.
        num_hidden_layers: decoder layers.
        num_attention_heads: attention heads.
        intermediate_size: MLP width.
        max_position_embeddings: context length; also the tokenizer's ``model_max_length``.
        seed: weight-initialization seed.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``hidden_size`` isn't divisible by ``num_attention_heads``, or ``vocab_size``
            is too small for the byte alphabet and special tokens.
    """
    import torch
    from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

    if hidden_size % num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(
        corpus, vocab_size=vocab_size, model_max_length=max_position_embeddings
    )
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PhiForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)

    model.save_pretrained(out)  # safetensors is the default (and only) format in v5
    tokenizer.save_pretrained(out)
    return out
