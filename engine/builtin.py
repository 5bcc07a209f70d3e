"""One base model in memory, its adapters, and batched generation with mixed adapters.

A :class:`BaseModelHost` owns one copy of a base model. Adapters are attached to it by name
with peft (``load_adapter`` / ``delete_adapter``) and a batch mixes them freely: ``generate``
gets one adapter name per row (``"__base__"`` for the base model), so ``set_adapter``, which
is global state, is never called. Everything that touches the model runs on the engine's one
generation thread (see :mod:`engine.batcher`); the tokenizer is also used by the
request threads, for encoding only.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from engine.adapters import AdapterCache, AdapterRef
from engine.decoding import (
    BASE,
    DeltaFn,
    FinishFn,
    PromptFn,
    Row,
    RowSampler,
    RowStopper,
    entry,
)
from engine.logprobs import TokenLogprob
from modelio.loading import ModelLoadError
from modelio.model_text import ModelText

log = logging.getLogger(__name__)

__all__ = ["BASE", "BaseModelHost", "pick_device", "pick_dtype"]


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(setting)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class BaseModelHost(ModelText):
    """A base model, its tokenizer and its loaded adapters.

    The constructor loads the tokenizer and config only (cheap, any thread); the weights
    load on the first :meth:`generate`, on the generation thread.

    Raises:
        ModelLoadError: the tokenizer or config of ``name`` does not load.
    """

    def __init__(self, name: str, device: torch.device, cache_count: int, cache_bytes: int):
        super().__init__(name)
        self.device = device
        self.dtype = pick_dtype(device)
        self.model: Any = None
        self.adapters = AdapterCache(cache_count, cache_bytes, self._load_adapter,
                                     self._unload_adapter)

    # ------------------------------------------------------------------ generation thread
    def load(self) -> None:
        """Load the weights (idempotent)."""
        if self.model is not None:
            return
        log.info("loading base model %s on %s (%s)", self.name, self.device, self.dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.name, dtype=self.dtype,
                                                         trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"could not load model '{self.name}': {e}",
                                 param="model") from e
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]

    def _load_adapter(self, ref: AdapterRef) -> int:
        log.info("loading adapter %s as %s", ref.path, ref.name)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(ref.path, adapter_name=ref.name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, ref.path, adapter_name=ref.name,
                                                   is_trainable=False)
        self.model.eval()
        marker = f".{ref.name}."
        return sum(p.numel() * p.element_size()
                   for n, p in self.model.named_parameters() if marker in n)

    def _unload_adapter(self, name: str) -> None:
        if not isinstance(self.model, PeftModel):
            return
        if list(self.model.peft_config) == [name]:
            # peft cannot run without an adapter: drop the LoRA layers, keep the base.
            self.model = self.model.unload()
        else:
            with warnings.catch_warnings():
                # "Adapter X was active which is now deleted": we never use the active adapter.
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.model.delete_adapter(name)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prepare(self, adapters: list[AdapterRef]) -> dict[str, Exception]:
        """Load the weights and the batch's adapters; returns the adapters that failed."""
        self.load()
        return self.adapters.ensure(adapters)

    @torch.inference_mode()
    def prompt_logprobs(self, row: Row) -> list[TokenLogprob]:
        """The logprobs of ``row``'s prompt tokens (the first is None), with the adapter."""
        ids = torch.tensor([row.prompt_ids], device=self.device)
        extra = {"adapter_names": [row.adapter]} if isinstance(self.model, PeftModel) else {}
        logits = self.model(input_ids=ids, **extra).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        k = row.logprobs or 0
        return [TokenLogprob(row.prompt_ids[0], None)] + [
            entry(token, logprobs[i], k) for i, token in enumerate(row.prompt_ids[1:])]

    @torch.inference_mode()
    def generate(self, rows: list[Row], on_delta: DeltaFn, on_finish: FinishFn,
                 cancelled: Callable[[Row], bool] = lambda r: False,
                 on_prompt: PromptFn = lambda row, entries: None) -> None:
        """Run ``rows`` as one left-padded batch; their adapters must be loaded
        (:meth:`prepare`).

        The prompt logprobs of rows that echo come first (``on_prompt``); rows that ask for
        no tokens end there. Text and the end of each row are reported through
        ``on_delta``/``on_finish`` as the batch advances.
        """
        scored: dict[tuple[str, tuple[int, ...]], list[TokenLogprob]] = {}
        for row in rows:
            if row.echo:
                key = (row.adapter, tuple(row.prompt_ids))
                if key not in scored:  # n choices of one prompt: scored once
                    scored[key] = (self.prompt_logprobs(row) if row.logprobs is not None
                                   else [TokenLogprob(t, None) for t in row.prompt_ids])
                on_prompt(row, scored[key])
            if row.max_new_tokens == 0:
                row.finish_reason = "length"
                on_finish(row)
        rows = [row for row in rows if row.max_new_tokens > 0]
        if not rows:
            return
        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            input_ids[i, width - n:] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[i, width - n:] = 1
        stopper = RowStopper(rows, self.tokenizer, on_delta, on_finish, cancelled)
        config = GenerationConfig(
            max_new_tokens=max(r.max_new_tokens for r in rows), do_sample=False, num_beams=1,
            # Only tokens that end every row: the stopper ends rows on their own stop tokens,
            # and a row that generate ended behind its back would be fed padding.
            pad_token_id=pad, eos_token_id=sorted(frozenset.intersection(
                *(r.stop_ids for r in rows))) or None,
        )
        extra: dict[str, Any] = {}
        if isinstance(self.model, PeftModel):
            extra["adapter_names"] = [r.adapter for r in rows]
        self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            generation_config=config, logits_processor=LogitsProcessorList([RowSampler(rows)]),
            stopping_criteria=StoppingCriteriaList([stopper]), **extra,
        )
        stopper.finish_all()

    def stats(self) -> dict[str, Any]:
        return {"loaded": self.model is not None, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "context_length": self.context_length, "adapters": len(self.adapters),
                "adapter_bytes": self.adapters.bytes, "adapter_loads": self.adapters.loads,
                "adapter_evictions": self.adapters.evictions}
