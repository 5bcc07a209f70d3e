"""The quality benchmark's report: one table row per model and format, the verdicts against
the goals, and a BENCHMARKS.md section replaced in place."""

from __future__ import annotations

from pathlib import Path

from bench import quality
from bench.recipe import RunResult
from shared.schemas import EvaluationScores


def scores(rouge_l: float) -> EvaluationScores:
    return EvaluationScores(rouge1=rouge_l + 0.05, rouge2=rouge_l / 3, rougeL=rouge_l,
                            exact_match=0.0)


def outcome() -> quality.Outcome:
    runs = {"recipe": RunResult("recipe", 100.0, 10_000, 15_000, 30, Path("a"), cpu_seconds=80.0),
            "lorafleet": RunResult("lorafleet", 50.0, 10_100, 10_100, 30, Path("b"),
                                   cpu_seconds=50.5)}
    result = quality.Outcome(quality.QUICK, "some records", 40, 1, ("1.0", "2.0"),
                             techniques="On this llama model ...")
    result.formats.append(quality.FormatOutcome("dolly", runs, {
        "base, chat template": scores(0.20), "base, same prompt": scores(0.06),
        "recipe": scores(0.25), "lorafleet": scores(0.30)}))
    return result


def test_the_report_has_a_row_per_model_and_the_verdicts() -> None:
    md = quality.markdown(outcome(), "a machine")

    assert md.startswith(f"## {quality.SECTION}\n")
    assert ("| `dolly` | **lorafleet** | 0.350 | 0.100 | 0.300 | 202.0 | 2.02 | 200.0 | 1.60 |"
            in md)
    assert "| `dolly` | recipe | 0.300 | 0.083 | 0.250 | 100.0 | 1.00 | 125.0 | 1.00 |" in md
    assert "| `dolly` | base, chat template | 0.250 | 0.067 | 0.200 |  |  |  |  |" in md
    assert ("- `dolly`: lorafleet ROUGE-L 0.300 vs recipe 0.250 (≥ recipe), +0.100 over the "
            "better base prompt (goal ≥ +0.08), 2.02× the recipe's tokens/s (1.60× per CPU "
            "second) (goal ≥ 1.5×)") in md


def test_the_section_is_replaced_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n## Serving\n\nfast\n\n## {quality.SECTION}\n\nold\n\n"
                    "## Recovery\n\nquick\n")

    quality.write_section(f"## {quality.SECTION}\n\nnew\n", path)

    assert path.read_text() == (f"# Benchmarks\n\n## Serving\n\nfast\n\n## {quality.SECTION}\n\n"
                                "new\n\n## Recovery\n\nquick\n")
