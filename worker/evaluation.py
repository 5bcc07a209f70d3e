"""The quality card of a job: how the base model and the fine-tuned model answer the job's own
validation records, scored against the records' responses.

Each record's prompt is rendered in the job's prompt format and tokenized as inference does it
(``shared.templates.render`` and :class:`~modelio.model_text.ModelText`); both models
decode it greedily, at most ``max_new_tokens`` tokens, stopping where a served answer stops
(the end-of-sequence tokens, the format's end marker). The answers are scored with ROUGE-1/2/L
F1 (``rouge-score``, stemmed) and exact match against the record's response.

The model loads once: the fine-tuned answers come from the adapter, the base answers from the
same weights inside peft's ``disable_adapter()``. The cost is bounded by the settings: at most
``eval_max_examples`` records (the first ones of the file), prompts no longer than the job's
``max_length``, ``eval_max_new_tokens`` tokens each, in batches of :data:`BATCH_SIZE`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from modelio.model_text import ModelText
from shared.records import iter_examples
from shared.schemas import Evaluation, EvaluationScores, TrainingSpec
from shared.templates import render, stop_sequences
from worker.training.hooks import StopTraining
from worker.training.model import pick_device

log = logging.getLogger(__name__)

BATCH_SIZE = 8  # prompts generated together (left-padded); sorted by length to pad little
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class EvaluationStopped(Exception):
    """The job was asked to stop (cancel, pause, shutdown, lost lease) during the evaluation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EvalExample:
    """One validation record as the evaluation uses it."""

    prompt_ids: list[int]
    reference: str


# --------------------------------------------------------------------------- the examples
def cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first of ``stops`` (the format's end marker), stripped."""
    end = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:end].strip()


def load_examples(path: Path, spec: TrainingSpec, text: ModelText, limit: int,
                  max_new_tokens: int) -> list[EvalExample]:
    """The first ``limit`` records of the validation file whose prompt fits: shorter than the
    job's ``max_length`` (training dropped longer ones too) and, with the answer, within the
    model's context.

    Raises:
        InvalidDataset: a record that does not fit the job's format (the file was checked when
            the job was created, so only if it changed since).
    """
    fmt = spec.prompt_format
    stops = stop_sequences(fmt)
    renderer = text.render_chat if fmt.type == "chat" else None
    room = min(spec.max_length, text.context_length - max_new_tokens)
    out: list[EvalExample] = []
    for _lineno, example in iter_examples(path, column_map=spec.column_map, prompt_format=fmt,
                                          param="validation_file"):
        if len(out) >= limit:
            break
        rendered = render(fmt, example, renderer)
        ids = text.encode(rendered.prompt)
        if not ids or len(ids) >= room:
            continue
        # The formats made of named parts answer with the record's response itself; a custom
        # one with its response template, end marker cut as an answer's would be.
        reference = (cut_at_stops(rendered.response, stops) if fmt.type == "custom"
                     else example.output.strip())
        out.append(EvalExample(ids, reference))
    return out


# --------------------------------------------------------------------------- generation
def _batches(examples: list[EvalExample]) -> Iterator[list[int]]:
    """Indices of ``examples`` in batches of similar prompt length."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    for start in range(0, len(order), BATCH_SIZE):
        yield order[start:start + BATCH_SIZE]


@torch.inference_mode()
def generate_answers(model: Any, tokenizer: Any, examples: list[EvalExample], *,
                     max_new_tokens: int, stop_ids: list[int], stops: list[str],
                     should_stop: Callable[[], str | None] | None = None) -> list[str]:
    """Greedy answers to ``examples``' prompts, in their order; each cut at the first of
    ``stops``.

    Raises:
        EvaluationStopped: ``should_stop`` returned a reason between two batches.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    if pad is None:  # never attended to (mask 0) nor decoded past a stop: any id will do
        pad = stop_ids[0] if stop_ids else 0
    answers = [""] * len(examples)
    for batch in _batches(examples):
        if should_stop is not None and (reason := should_stop()):
            raise EvaluationStopped(reason)
        width = max(len(examples[i].prompt_ids) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where answers start
            prompt = examples[i].prompt_ids
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
            pad_token_id=pad, use_cache=True,
            # Ends a row at the format's end marker instead of after max_new_tokens.
            **({"stop_strings": stops, "tokenizer": tokenizer} if stops else {}))
        for row, i in enumerate(batch):
            new = out[row, width:].tolist()
            answers[i] = cut_at_stops(tokenizer.decode(new, skip_special_tokens=True), stops)
    return answers


# --------------------------------------------------------------------------- scoring
def _normalized(text: str) -> str:
    return " ".join(text.split())


def score(answers: list[str], references: list[str]) -> EvaluationScores:
    """Mean ROUGE-1/2/L F1 (stemmed) and exact match (whitespace aside) of ``answers``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    exact = 0
    for answer, reference in zip(answers, references, strict=True):
        scores = scorer.score(reference, answer)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
        exact += _normalized(answer) == _normalized(reference)
    n = max(len(answers), 1)
    return EvaluationScores(rouge1=totals["rouge1"] / n, rouge2=totals["rouge2"] / n,
                            rougeL=totals["rougeL"] / n, exact_match=exact / n)


# --------------------------------------------------------------------------- the card
def _dtype(device: str) -> torch.dtype:
    """What serving computes in: bf16 where the GPU has it, fp16 on older GPUs, fp32 else."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass(frozen=True)
class Answers:
    """Both models' answers to the same examples, and what they were scored against."""

    references: list[str]
    base: list[str]
    fine_tuned: list[str]


def answer_both(spec: TrainingSpec, adapter_dir: Path, examples: list[EvalExample],
                text: ModelText, *, device: str, max_new_tokens: int,
                should_stop: Callable[[], str | None] | None = None) -> Answers:
    """The base model's and the adapter's greedy answers; the model loads once.

    The base model loads unquantized in the dtype serving uses (a 4-bit job's adapter is
    judged as it is served).
    """
    base = AutoModelForCausalLM.from_pretrained(spec.model, dtype=_dtype(device),
                                                trust_remote_code=False)
    base = base.to(device)  # type: ignore[arg-type]
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    fmt = spec.prompt_format
    stop_ids = sorted(text.eos_ids | (text.chat_end_ids() if fmt.type == "chat"
                                       else frozenset()))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "stop_ids": stop_ids,
                              "stops": stop_sequences(fmt), "should_stop": should_stop}
    try:
        tuned = generate_answers(model, text.tokenizer, examples, **kwargs)
        with model.disable_adapter():
            plain = generate_answers(model, text.tokenizer, examples, **kwargs)
    finally:
        del model, base
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return Answers([e.reference for e in examples], plain, tuned)


def evaluate(spec: TrainingSpec, adapter_dir: Path, validation_path: Path, *, device: str,
             max_examples: int, max_new_tokens: int,
             should_stop: Callable[[], str | None] | None = None) -> Evaluation | None:
    """The quality card of a trained adapter; None when no validation record fits.

    Raises:
        EvaluationStopped: ``should_stop`` gave a reason before the answers were all there.
        ModelLoadError, InvalidDataset, OSError, ...: anything that went wrong; the caller
            (:func:`record_evaluation`) reports it rather than failing the job.
    """
    device = pick_device(device)
    text = ModelText(spec.model)
    examples = load_examples(validation_path, spec, text, max_examples, max_new_tokens)
    if not examples:
        return None
    if should_stop is not None and (reason := should_stop()):
        raise EvaluationStopped(reason)  # before the model loads
    answers = answer_both(spec, adapter_dir, examples, text, device=device,
                          max_new_tokens=max_new_tokens, should_stop=should_stop)
    return Evaluation(base=score(answers.base, answers.references),
                      fine_tuned=score(answers.fine_tuned, answers.references),
                      examples=len(examples), max_new_tokens=max_new_tokens)


# --------------------------------------------------------------------------- on the job
class JobWriter(Protocol):
    """What :func:`record_evaluation` needs of the job runner's hooks."""

    def write(self, *, best_effort: bool = False, **values: Any) -> None: ...

    def should_stop(self) -> str | None: ...


_STOPPED = {
    "cancel": "the job was cancelled",
    "pause": "a pause was requested",
    "preempt": "the worker is shutting down",
    "lost": "this worker lost the job",
}


def _summary(card: Evaluation) -> str:
    b, t = card.base, card.fine_tuned
    return (f"Evaluation on {card.examples} validation example(s): ROUGE-L base "
            f"{b.rougeL:.3f} → fine-tuned {t.rougeL:.3f} (ROUGE-1 {b.rouge1:.3f} → "
            f"{t.rouge1:.3f}, ROUGE-2 {b.rouge2:.3f} → {t.rouge2:.3f}, exact match "
            f"{b.exact_match:.0%} → {t.exact_match:.0%})")


def record_evaluation(job: JobWriter, spec: TrainingSpec, adapter_dir: Path,
                      validation_path: Path, *, device: str, max_examples: int,
                      max_new_tokens: int) -> Evaluation | None:
    """Evaluate a succeeded job's adapter and store the card on the job, with an event.

    Never fails the job: an evaluation that cannot be made (or is cut short by a cancel, a
    pause or a shutdown) becomes a warning event and the job goes on to succeed without a card.

    Raises:
        StopTraining: the lease was lost while the card was written (from ``job.write``).
    """
    if max_examples <= 0:
        return None
    started = time.perf_counter()
    job.write(best_effort=True, event="Evaluating the base model and the fine-tuned model on "
              f"the validation records (at most {max_examples})")
    try:
        card = evaluate(spec, adapter_dir, validation_path, device=device,
                        max_examples=max_examples, max_new_tokens=max_new_tokens,
                        should_stop=job.should_stop)
    except EvaluationStopped as e:
        _warn(job, f"Evaluation skipped: {_STOPPED.get(e.reason, e.reason)}")
        return None
    except StopTraining:
        raise
    except Exception as e:  # noqa: BLE001 - the job trained fine; the card is a bonus
        log.warning("evaluation of %s failed", adapter_dir, exc_info=True)
        _warn(job, f"Evaluation failed, the job has no evaluation: {type(e).__name__}: {e}")
        return None
    if card is None:
        _warn(job, "Evaluation skipped: no validation record has a prompt shorter than "
                   f"max_length={spec.max_length} tokens")
        return None
    data = card.model_dump()
    data["seconds"] = round(time.perf_counter() - started, 1)
    try:
        job.write(evaluation=card.model_dump(), event=_summary(card), event_data=data)
    except StopTraining:
        raise
    except Exception:  # noqa: BLE001 - a database outage: the job still succeeds
        log.warning("could not store the evaluation of %s", adapter_dir, exc_info=True)
        return None
    return card


def _warn(job: JobWriter, message: str) -> None:
    try:
        job.write(best_effort=True, event=message, level="warn")
    except StopTraining:
        raise
    except Exception:  # noqa: BLE001
        log.warning("could not record %r", message, exc_info=True)
