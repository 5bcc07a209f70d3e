"""The DPO benchmark's pieces: the preference accuracy as defined (the policy's log-ratio of
preferred over non-preferred above the reference's), the pairs it builds, and its report."""

from __future__ import annotations

from bench import dpo
from shared.records import validate_record


def test_preference_accuracy_compares_log_ratios_with_the_reference() -> None:
    policy = ([-10.0, -10.0, -30.0, -5.0], [-20.0, -8.0, -20.0, -5.0])
    reference = ([-12.0, -12.0, -31.0, -5.0], [-18.0, -9.0, -25.0, -5.0])

    got = dpo.scores(policy, reference, ["a b", "c"] * 2, ["a b", "d"] * 2)
    itself = dpo.scores(policy, policy, ["a"] * 4, ["a"] * 4)

    # Margins: (+10) - (+6) > 0; (-2) - (-3) > 0; (-10) - (-6) < 0; 0 - 0 = 0.
    assert got.accuracy == 0.5
    assert got.prefers == 0.25  # only the first pair: the policy's own likelihoods
    assert got.rouge_l == 0.5
    assert itself.accuracy == 0.0, "a model that is its own reference has no positive margin"


def test_a_pair_is_a_preference_record_of_the_request() -> None:
    record = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."}

    line = dpo.pair(record, "#Person1#: Hi.")
    example = validate_record(line)

    assert example.shape == "preference"
    assert example.output == "They greet."
    assert line["input"]["messages"] == dpo.request(record["dialogue"])
    assert line["non_preferred_output"][0]["content"] == "#Person1#: Hi."


def test_the_report_states_the_goals() -> None:
    outcome = dpo.Outcome(dpo.QUICK, data="some pairs", threads=1, loads=("1.0", "2.0"),
                          train_seconds={"DPO": 10.0, "SFT": 5.0, "SFT → DPO": 9.0},
                          settings={"DPO": "beta 0.1", "SFT": "lr 0.0002"})
    outcome.scores = {"base": dpo.Scores(0.0, 0.1, 0.150), "DPO": dpo.Scores(0.9, 0.6, 0.230),
                      "SFT": dpo.Scores(0.7, 0.5, 0.260),
                      "SFT → DPO": dpo.Scores(0.85, 0.7, 0.270)}

    md = dpo.markdown(outcome, "a machine", 123.0)

    assert md.startswith(f"## {dpo.SECTION}\n")
    assert "| **DPO** | base | 0.90 | 0.60 | 0.230 |" in md
    assert "| **SFT → DPO** | SFT | 0.85 | 0.70 | 0.270 |" in md
    assert ("- DPO: preference accuracy 0.00 → 0.90 (goal ≥ 0.8), ROUGE-L 0.230, +0.080 over "
            "the base model's (goal ≥ +0.05).") in md


def rpo_outcome() -> dpo.Outcome:
    outcome = dpo.Outcome(dpo.FULL, data="some pairs", threads=1, loads=("1.0", "2.0"),
                          train_seconds={"DPO": 3600.0}, settings={"DPO": "beta 0.1"},
                          rpo_alpha=1.0, command="python -m bench.dpo --rpo-alpha 1",
                          started="2026-12-07 23:00 UTC")
    outcome.scores = {"base": dpo.Scores(0.0, 0.48, 0.168), "DPO": dpo.Scores(0.96, 0.9, 0.200)}
    return outcome


def test_a_run_with_the_rpo_term_reports_its_runs_beside_the_base_model() -> None:
    md = dpo.markdown(rpo_outcome(), "a machine", 4000.0)

    assert md.startswith(f"{dpo.RPO_TITLE} (rpo_alpha 1)\n")
    assert "`python -m bench.dpo --rpo-alpha 1` (full size, 2026-12-07 23:00 UTC to " in md
    assert "1-min load average 1.0 at the start, 2.0 at the end" in md
    assert "Training seconds: DPO + RPO (α 1) 3,600." in md
    assert "| base | itself | 0.00 | 0.48 | 0.168 |" in md
    assert "| **DPO + RPO (α 1)** | base | 0.96 | 0.90 | 0.200 |" in md
    assert "SFT" not in md, "the runs it did not score are not in its report"
    assert ("- DPO + RPO (α 1): preference accuracy 0.00 → 0.96 (goal ≥ 0.8), ROUGE-L 0.200, "
            "+0.032 over the base model's (goal ≥ +0.05): **accuracy goal met; ROUGE-L goal "
            "missed**.") in md


def test_the_rpo_subsection_goes_into_the_section_and_replaces_only_itself(tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    plain = f"## {dpo.SECTION}\n\nThe plain run.\n\n| **DPO** | base | 1.00 |\n\nA closing note.\n"
    path.write_text(f"# Benchmarks\n\n## Other\n\nx\n\n{plain}\n## After\n\ny\n")
    first = dpo.markdown(rpo_outcome(), "a machine", 4000.0)
    again = rpo_outcome()
    again.scores["DPO"] = dpo.Scores(0.98, 0.92, 0.240)

    dpo.write_variant(first, path)
    dpo.write_variant(dpo.markdown(again, "a machine", 4000.0), path)

    text = path.read_text()
    assert text.startswith(f"# Benchmarks\n\n## Other\n\nx\n\n{plain}\n{dpo.RPO_TITLE} ")
    assert text.count(dpo.RPO_TITLE) == 1
    assert "0.240" in text and "0.200" not in text
    assert text.endswith("**both goals met**.\n\n## After\n\ny\n")
