"""Serving benchmark, status polls: ``GET /v1/fine_tuning/jobs/{id}`` timed with the engine
idle and saturated, without and with the web console's own requests.

The console's load is measured as the API sees it: its job page's requests (path and time)
are recorded once in headless Chromium, on the idle engine before anything is timed, then
replayed over HTTP by a small client in a process of its own while the polls are timed.
Chromium is closed by then: its renderer and compositor would otherwise take CPU from the
API on the same cores, and the figure would measure the browser, not the console's requests
(the first version of this benchmark did). Without Chromium the schedule is the one the
console's code makes (:func:`derived_schedule`). Used by ``bench/serving.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from bench.serving_latency import LiveService, percentile

Request = tuple[float, str]  # seconds after the page opened, path (a GET)
# The console's job page (api/console/static/js/poll.js and views/job.js): the job every
# VISIBLE_MS while in view, its events at most EVENTS_EVERY_MS apart for a job that does not
# move, its checkpoints when it opens.
CONSOLE_POLL_SECONDS = 2.0
CONSOLE_EVENTS_SECONDS = 15.0


# --------------------------------------------------------------------------- the console's requests
def derived_schedule(job_id: str, seconds: float) -> list[Request]:
    """The job page's requests for ``seconds`` on a job that does not move (the polled job is
    queued), as the console's code makes them: on opening the job, its events and its
    checkpoints; then the job every 2 s, and its events again once 15 s have passed."""
    job = f"/v1/fine_tuning/jobs/{job_id}"
    out: list[Request] = [(0.0, job), (0.0, f"{job}/events?limit=100"),
                          (0.0, f"{job}/checkpoints?limit=100")]
    events_at, at = 0.0, CONSOLE_POLL_SECONDS
    while at < seconds:
        out.append((at, job))
        if at - events_at > CONSOLE_EVENTS_SECONDS:
            out.append((at, f"{job}/events?limit=100"))
            events_at = at
        at += CONSOLE_POLL_SECONDS
    return out


def recorded_schedule(entries: list[dict[str, Any]]) -> list[Request]:
    """The page's API requests from its resource-timing entries (``name``: the URL,
    ``startTime``: ms after the page opened), as times from the first one."""
    api = sorted((float(e["startTime"]) / 1000, urlsplit(str(e["name"])))
                 for e in entries if urlsplit(str(e["name"])).path.startswith("/v1/"))
    if not api:
        return []
    first = api[0][0]
    return [(round(at - first, 3), u.path + (f"?{u.query}" if u.query else "")) for at, u in api]


def cycle(schedule: list[Request], period: float) -> Iterator[Request]:
    """``schedule`` repeated every ``period`` seconds, without end (the page kept open)."""
    for k in range(1 << 62):
        for at, path in schedule:
            yield k * period + at, path


def chromium_path() -> str | None:
    """The system's Chromium (as the console's browser tests find it)."""
    return (os.environ.get("LORAFLEET_TEST_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))


def record_console(url: str, key: str, job_id: str, seconds: float, chromium: str
                   ) -> tuple[list[Request], str]:
    """Sign in to the web console in headless Chromium, open the job's page for ``seconds``
    and return the API requests it made, with the browser's version."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: run as root, Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/console")
            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("heading", name="Fine-tuning jobs", exact=True).wait_for()
            # Cleared before the job's page opens, so its first requests are in the record.
            page.evaluate("performance.clearResourceTimings();"
                          "performance.setResourceTimingBufferSize(5000)")
            page.goto(f"{url}/console#/jobs/{job_id}")
            time.sleep(seconds)
            entries = page.evaluate(
                "performance.getEntriesByType('resource')"
                ".filter(e => e.initiatorType === 'fetch')"
                ".map(e => ({name: e.name, startTime: e.startTime}))")
            return recorded_schedule(entries), f"headless {browser.version}"
        finally:
            browser.close()


def console_schedule(service: LiveService, args: argparse.Namespace
                     ) -> tuple[list[Request], float, str]:
    """The console's requests to replay, the period they repeat at, and where they come from
    (recorded in Chromium, or derived from its code where Chromium is missing or fails)."""
    seconds = args.console_record_seconds
    chromium = chromium_path()
    why = "no Chromium (apt-get install chromium)"
    if chromium is not None:
        try:
            schedule, browser = record_console(service.url, service.key, service.polled,
                                               seconds, chromium)
            if schedule:
                return schedule, seconds, f"recorded in {browser}"
            why = f"{browser} recorded no API request"
        except Exception as e:  # noqa: BLE001 - the console's code says what it requests
            why = f"Chromium failed: {type(e).__name__}: {e}"
    return (derived_schedule(service.polled, seconds), seconds,
            f"derived from the console's code ({why})")


# --------------------------------------------------------------------------- clients
def _load(url: str, key: str, models: list[str], concurrency: int, max_tokens: int,
          go: Any, stop: Any, sent: Any) -> None:
    """A separate process: ``concurrency`` clients sending completions while ``go`` is set,
    until ``stop``."""
    import httpx

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while not stop.is_set():
            if not go.is_set():
                await asyncio.sleep(0.01)
                continue
            r = await http.post("/v1/completions", json={
                "model": models[(i + n) % len(models)], "prompt": f"Hello number {n}",
                "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            n += 1
            with sent.get_lock():
                sent.value += 1

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300,
                                     limits=httpx.Limits(max_connections=256),
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            await asyncio.gather(*(client(i, http) for i in range(concurrency)))

    asyncio.run(main())


def _replay(url: str, key: str, schedule: list[Request], period: float, go: Any, stop: Any,
            sent: Any) -> None:
    """A separate process, the console's stand-in: each time ``go`` is set (the page opened),
    send ``schedule``'s GETs at their times, one after the other as the page does, until
    ``go`` is cleared (the page closed); until ``stop``."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=60) as http:
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            opened = time.monotonic()
            for at, path in cycle(schedule, period):
                while (wait := opened + at - time.monotonic()) > 0 and go.is_set():
                    time.sleep(min(wait, 0.05))
                if not go.is_set() or stop.is_set():
                    break
                http.get(path).raise_for_status()
                with sent.get_lock():
                    sent.value += 1


def _poll(http: Any, job_id: str, seconds: float) -> list[float]:
    """``GET`` the job every 20 ms for ``seconds`` (a client watching its job); latencies in
    milliseconds."""
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        http.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)
    return times


def _stop(process: Any, stop: Any, *events: Any) -> None:
    stop.set()
    for event in events:
        event.clear()
    process.join(timeout=120)
    if process.is_alive():
        process.terminate()


# --------------------------------------------------------------------------- the measurement
def summarize(times: dict[str, list[float]]) -> dict[str, Any]:
    """p50/p99 of each state's polls and the ratios the goals compare: saturated vs idle,
    saturated with the console's requests vs idle without, and vs saturated without."""
    out: dict[str, Any] = {
        name: {"polls": len(values), "p50_ms": round(percentile(values, 50), 2),
               "p99_ms": round(percentile(values, 99), 2)}
        for name, values in times.items()}
    idle, busy = out["idle"]["p99_ms"], out["busy"]["p99_ms"]
    out["p99_ratio"] = round(busy / idle, 2)
    if "busy_console" in out:
        out["console_p99_ratio"] = round(out["busy_console"]["p99_ms"] / idle, 2)
        out["console_vs_without"] = round(out["busy_console"]["p99_ms"] / busy, 2)
        out["console_idle_p99_ratio"] = round(out["idle_console"]["p99_ms"] / idle, 2)
    return out


def status_poll(service: LiveService, args: argparse.Namespace, console: bool
                ) -> dict[str, Any]:
    """p50/p99 of ``GET /v1/fine_tuning/jobs/{id}`` with the engine idle and saturated by
    ``args.requests`` clients sending completions through the API, in ``args.windows``
    alternating rounds (slow changes in the machine's load stay out of the comparison); with
    ``console``, each idle and saturated pair of windows is followed by another pair with the
    console's requests replayed (the page opened before it, closed after)."""
    import httpx

    results: dict[str, Any] = {"load_clients": args.requests, "windows": args.windows,
                               "window_seconds": round(args.poll_seconds / args.windows, 2),
                               "load_average": round(os.getloadavg()[0], 2)}
    schedule: list[Request] = []
    if console:
        schedule, period, source = console_schedule(service, args)
        results["console"] = {"source": source, "period_s": period,
                              "requests": len(schedule), "schedule": schedule}
    else:
        results["console"] = {"source": "not replayed (--no-console)"}

    ctx = multiprocessing.get_context("spawn")
    go, stop, sent = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    loader = ctx.Process(target=_load, daemon=True,
                         args=(service.url, service.key, service.names, args.requests,
                               args.max_tokens, go, stop, sent))
    page, page_stop, replayed = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    replay = ctx.Process(target=_replay, daemon=True,
                         args=(service.url, service.key, schedule, results["console"].get(
                             "period_s", 1.0), page, page_stop, replayed))
    loader.start()
    if schedule:
        replay.start()
    times: dict[str, list[float]] = {}
    window = args.poll_seconds / args.windows
    opened_for = 0.0  # seconds the console's stand-in was open
    headers = {"Authorization": f"Bearer {service.key}"}
    # This process holds the benchmark's models, torch and transformers (~0.5 M objects, a full
    # collection takes ~0.3 s here), which a client watching its job would not: out of the
    # garbage collector's way while the polls are timed.
    gc.collect()
    gc.freeze()
    try:
        with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
            _poll(http, service.polled, 1)  # warm-up
            for _ in range(args.windows):
                for with_console in ([False, True] if schedule else [False]):
                    opened = time.monotonic()
                    if with_console:
                        page.set()  # kept open through an idle and a saturated window
                    for mode in ("idle", "busy"):
                        if mode == "idle":
                            go.clear()
                            while (state := service.engine_stats())["busy"] or state["queued"]:
                                time.sleep(0.05)
                        else:
                            go.set()
                            while not service.engine_stats()["busy"]:
                                time.sleep(0.01)
                        name = mode + ("_console" if with_console else "")
                        times.setdefault(name, []).extend(_poll(http, service.polled, window))
                    if with_console:
                        page.clear()
                        opened_for += time.monotonic() - opened
    finally:
        gc.unfreeze()
        _stop(loader, stop, go)
        if schedule:
            with contextlib.suppress(Exception):
                _stop(replay, page_stop, page)
    results.update(summarize(times))
    results["completions"] = sent.value
    if schedule:
        results["console"]["replayed"] = replayed.value
        results["console"]["seconds_open"] = round(opened_for, 1)
    return results
