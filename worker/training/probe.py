"""The parity probe: the greedy tokens peft produces with a freshly trained adapter for one
fixed prompt, stored with the adapter so that an inference engine can check, the first time it
loads the adapter, that it generates the very same tokens.

The prompt is what inference sends for a completion of :data:`PROBE_INPUT`: the text wrapped
in the adapter's prompt format (:func:`shared.templates.render_prompt`, the chat format with
the tokenizer's chat template), tokenized as the engines tokenize it
(:class:`~modelio.model_text.ModelText`). Generation is greedy, at most
:data:`PROBE_MAX_NEW_TOKENS` tokens, and stops where a served reply stops: at the model's
end-of-sequence tokens and, in the chat format, at the token that closes an assistant turn.
The stored probe names those stop ids and the token budget, so that an engine can replay it
exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft import PeftModel

from modelio.model_text import ModelText
from shared.schemas import TrainingSpec
from shared.templates import render_prompt
from worker.training.model import unfuse_tanh_gelu

log = logging.getLogger(__name__)

PROBE_INPUT = ("#Person1#: Hello, how are you today?\n"
               "#Person2#: Fine, thanks. I am going to the market.")
PROBE_MAX_NEW_TOKENS = 16


def parity_probe(model: PeftModel, tokenizer: Any, spec: TrainingSpec) -> dict[str, Any] | None:
    """Generate the probe with the trained ``model`` on its own device and dtype.

    Puts ``model`` in eval mode (and undoes training-only changes): call it once training is
    over. Returns ``{"prompt_ids", "token_ids", "text", "max_new_tokens", "stop_token_ids"}``
    (``token_ids``: the new tokens only, the stop token included if one was reached; ``text``:
    them decoded without special tokens), or None if the probe could not be made (logged):
    the adapter is good all the same, it only goes without a parity check.
    """
    fmt = spec.prompt_format
    try:
        # The base model's text side as the engines see it: chat template, tokenization
        # and the ids that end a reply.
        text = ModelText(spec.model)
        prompt_ids = text.encode(render_prompt(fmt, PROBE_INPUT, text.render_chat))
        if not prompt_ids:
            return None
        stops = sorted(text.eos_ids | (text.chat_end_ids() if fmt.type == "chat"
                                        else frozenset()))
        model.eval()
        unfuse_tanh_gelu(model)  # the probe is what from_pretrained's model computes
        device = next(model.parameters()).device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                num_beams=1, max_new_tokens=PROBE_MAX_NEW_TOKENS, eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id, use_cache=True)
    except Exception:  # noqa: BLE001 - the probe is a check for later, never a reason to fail
        log.warning("could not generate the parity probe; the adapter has none", exc_info=True)
        return None
    new = out[0, len(prompt_ids):].tolist()
    return {"prompt_ids": prompt_ids, "token_ids": new,
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "max_new_tokens": PROBE_MAX_NEW_TOKENS, "stop_token_ids": stops}
