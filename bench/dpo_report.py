"""The outcome of ``python -m bench.dpo`` and its report: the section of BENCHMARKS.md for the
full plain run, a subsection for any other (:data:`RPO_TITLE`), which leaves the full run's
figures as they are."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bench import report
from shared.records import DEFAULT_INSTRUCTION

SECTION = "Preference tuning (DPO)"
RPO_TITLE = "### DPO with the RPO term"
GOAL_ACCURACY = 0.8
GOAL_ROUGE_MARGIN = 0.05


@dataclass(frozen=True)
class Plan:
    """The size of one run."""

    name: str
    train_pairs: int
    held_out: int
    max_prompt_tokens: int  # dialogues whose request is longer are passed over (CPU time)
    max_new_tokens: int  # of every greedy answer (the non-preferred ones and the scored ones)
    dpo_epochs: float
    sft_epochs: float


FULL = Plan("full", train_pairs=200, held_out=50, max_prompt_tokens=160, max_new_tokens=48,
            dpo_epochs=1, sft_epochs=1)
QUICK = Plan("quick", train_pairs=8, held_out=4, max_prompt_tokens=160, max_new_tokens=16,
             dpo_epochs=1, sft_epochs=1)
# A job's settings besides the method: batches of 4, LoRA r 16 on the projections, the chat
# format, each method's default learning rate (learning_rate_multiplier 1).
BATCH_SIZE = 4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
SEED = 42


@dataclass
class Scores:
    accuracy: float | None  # the preference accuracy (policy vs its reference)
    prefers: float  # share of pairs where the model finds the preferred answer more likely
    rouge_l: float


@dataclass
class Outcome:
    plan: Plan
    data: str = ""
    threads: int = 1
    loads: tuple[str, str] = ("", "")
    scores: dict[str, Scores] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    rpo_alpha: float | None = None
    command: str = ""  # the command line, for a subsection (the full section names its own)
    started: str = ""


def label(name: str, rpo_alpha: float | None) -> str:
    """How a run (``DPO``, ``SFT``, ``SFT → DPO``) is named in the logs and the report."""
    return f"{name} + RPO (α {rpo_alpha:g})" if rpo_alpha and name.endswith("DPO") else name


REFERENCES = {"base": "itself", "DPO": "base", "SFT": "base", "SFT → DPO": "SFT"}


# --------------------------------------------------------------------------- the report
def is_variant(outcome: Outcome) -> bool:
    """Not the full plain run: its report is a subsection, not the section."""
    return bool(outcome.rpo_alpha) or set(outcome.scores) != set(REFERENCES)


def markdown(outcome: Outcome, where: str, seconds: float) -> str:
    """The section of the full plain run; for any other, the subsection
    (:func:`variant_markdown`)."""
    if is_variant(outcome):
        return variant_markdown(outcome, where, seconds)
    plan = outcome.plan
    base, dpo, then = (outcome.scores[k] for k in ("base", "DPO", "SFT → DPO"))
    lines = [
        f"## {SECTION}",
        "",
        f"`python -m bench.dpo` ({plan.name} size, {report.stamp()}, {seconds:,.0f} s in all): "
        "SmolLM2-135M-Instruct (`lorafleet models pull smollm2-135m`) taught by DPO jobs to "
        "prefer DialogSum's reference summaries over its own answers, each job run as the "
        "worker runs it (the method's data preparation and `train_adapter`).",
        "",
        f"- Machine: {where}; {outcome.threads} torch thread(s); 1-min load average "
        f"{outcome.loads[0]} at the start, {outcome.loads[1]} at the end (shared machine).",
        f"- Data: {outcome.data}. Requests in SmolLM2's chat template (the job's `chat` "
        f"format): one user message, \"{DEFAULT_INSTRUCTION}\", a blank line, the dialogue.",
        f"- Jobs: batch {BATCH_SIZE}, LoRA r {LORA['r']} / alpha {LORA['alpha']} on the "
        f"projections, seed {SEED}, each method's default learning rate; DPO: "
        f"{outcome.settings['DPO']}, {plan.dpo_epochs:g} epoch; SFT: {outcome.settings['SFT']}, "
        f"{plan.sft_epochs:g} epoch on the same dialogues with their reference summaries. "
        "Training seconds: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                         outcome.train_seconds.items()) + ".",
        f"- Held out: the {plan.held_out} validation pairs. *Preference accuracy*: the share "
        "whose policy log-ratio of preferred over non-preferred is above the reference's (the "
        "model's DPO reward margin is positive); a model that is its own reference scores 0. "
        "*Prefers*: the share where the model gives the preferred answer the higher "
        "log-probability. *ROUGE-L*: F1 (stemmed) of its greedy answers (at most "
        f"{plan.max_new_tokens} tokens) against the reference summaries.",
        "",
    ]
    header = ["model", "reference", "preference accuracy", "prefers", "ROUGE-L"]
    rows = [[f"**{name}**" if name in ("DPO", "SFT → DPO") else name, REFERENCES[name],
             f"{s.accuracy:.2f}" if s.accuracy is not None else "", f"{s.prefers:.2f}",
             f"{s.rouge_l:.3f}"] for name, s in outcome.scores.items()]
    lines += [report.table(header, rows), ""]
    for name, s in (("DPO", dpo), ("SFT → DPO", then)):
        assert s.accuracy is not None
        lines.append(
            f"- {name}: preference accuracy {base.accuracy:.2f} → {s.accuracy:.2f} (goal ≥ "
            f"{GOAL_ACCURACY}), ROUGE-L {s.rouge_l:.3f}, {s.rouge_l - base.rouge_l:+.3f} over "
            f"the base model's (goal ≥ +{GOAL_ROUGE_MARGIN}).")
    return "\n".join(lines) + "\n"


def goal_line(name: str, s: Scores, base: Scores) -> str:
    assert s.accuracy is not None and base.accuracy is not None
    met = {"accuracy": s.accuracy >= GOAL_ACCURACY,
           "ROUGE-L": s.rouge_l - base.rouge_l >= GOAL_ROUGE_MARGIN}
    verdict = ("both goals met" if all(met.values()) else "both goals missed"
               if not any(met.values()) else
               "; ".join(f"{k} goal {'met' if ok else 'missed'}" for k, ok in met.items()))
    return (f"- {name}: preference accuracy {base.accuracy:.2f} → {s.accuracy:.2f} (goal ≥ "
            f"{GOAL_ACCURACY}), ROUGE-L {s.rouge_l:.3f}, {s.rouge_l - base.rouge_l:+.3f} over "
            f"the base model's (goal ≥ +{GOAL_ROUGE_MARGIN}): **{verdict}**.")


def variant_markdown(outcome: Outcome, where: str, seconds: float) -> str:
    """The subsection of a run other than the full plain one: the runs it scored beside the
    base model, with the command that made them."""
    plan, alpha = outcome.plan, outcome.rpo_alpha
    title = RPO_TITLE if alpha else "### Part of the runs"
    names = [n for n in outcome.scores if n != "base"]
    header = ["model", "reference", "preference accuracy", "prefers", "ROUGE-L"]
    rows = [[f"**{label(n, alpha)}**" if n.endswith("DPO") else n, REFERENCES[n],
             f"{s.accuracy:.2f}" if s.accuracy is not None else "", f"{s.prefers:.2f}",
             f"{s.rouge_l:.3f}"] for n, s in outcome.scores.items()]
    lines = [
        f"{title}{f' (rpo_alpha {alpha:g})' if alpha else ''}",
        "",
        f"`{outcome.command}` ({plan.name} size, {outcome.started} to {report.stamp()}, "
        f"{seconds:,.0f} s in all): {', '.join(names)} as above"
        + (f", with TRL's RPO term in the DPO loss (the preferred answers' negative "
           f"log-likelihood, weight {alpha:g})" if alpha else "")
        + ", on the same pairs and held-out set, scored the same way.",
        "",
        f"- Machine: {where}; {outcome.threads} torch thread(s); 1-min load average "
        f"{outcome.loads[0]} at the start, {outcome.loads[1]} at the end (shared machine).",
        f"- Data: {outcome.data}.",
        f"- Jobs: as above; DPO: {outcome.settings['DPO']}, {plan.dpo_epochs:g} epoch. Training "
        "seconds: " + ", ".join(f"{label(k, alpha)} {v:,.0f}" for k, v in
                                outcome.train_seconds.items()) + ".",
        "",
        report.table(header, rows),
        "",
    ]
    lines += [goal_line(label(n, alpha), outcome.scores[n], outcome.scores["base"])
              for n in names if n.endswith("DPO")]
    return "\n".join(lines) + "\n"


def write_variant(md: str, path: Path = report.BENCHMARKS) -> None:
    """Put the subsection ``md`` at the end of the section in ``path``, in place of the one
    with the same title (up to a parenthesis); the rest of the file stays as it is."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    found = re.search(rf"^## {re.escape(SECTION)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    if not found:
        raise SystemExit(f"{path} has no '{SECTION}' section to add to: write the full run's "
                         "first (python -m bench.dpo --write)")
    title = md.split("\n", 1)[0].split(" (", 1)[0]
    section = re.sub(rf"^{re.escape(title)}\b.*?(?=^##+ |\Z)", "", found.group(0),
                     flags=re.S | re.M)
    section = section.rstrip() + "\n\n" + md.strip() + "\n"
    rest = text[found.end():]
    path.write_text(text[:found.start()] + section + ("\n" + rest if rest else ""),
                    encoding="utf-8")
