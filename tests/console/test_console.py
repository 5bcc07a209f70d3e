"""The console in a real browser, used as a person would, against live API, worker and engine
processes: sign in, upload, create a job, watch its loss curve grow, pause, resume and cancel,
see it succeed, stream a reply from the new model; and the errors a person meets."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from api.console import STATIC_DIR
from tests.console.conftest import SAVE_GATE_SITE, Console
from tests.engine.conftest import ServingStack
from tests.support import (
    create_job,
    dialogsum_records,
    jsonl_bytes,
    list_all_events,
    upload_dialogsum,
)
from tests.support.stack import REPO_ROOT, Stack, StackFactory, free_port

pytestmark = pytest.mark.e2e

# The serving stack starts no worker: the module's one is started below, with the save gate.
SERVING_WORKERS = 0


def js_constant(module: str, name: str) -> int:
    """A number a console module declares (``const NAME = 2000;``), as the page uses it."""
    text = (STATIC_DIR / "js" / module).read_text()
    match = re.search(rf"\bconst {name} = (\d+);", text)
    assert match, f"{module} declares no {name}"
    return int(match.group(1))


VISIBLE_POLL_MS = js_constant("poll.js", "VISIBLE_MS")
HIDDEN_POLL_MS = js_constant("poll.js", "HIDDEN_MS")
EVENTS_EVERY_MS = js_constant("views/job.js", "EVENTS_EVERY_MS")
# Timers never fire early, but the two clocks read a moment apart: a little slack.
CLOCK_SLACK_MS = 50
LONG = 180_000  # ms: what one step of a person's journey may take on a slow machine


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("save-gate")


@pytest.fixture(scope="module")
def live(serving: ServingStack, gate: Path) -> Stack:
    """The serving stack with one worker that holds the save of step N while gate/hold-N
    exists."""
    env = {"PYTHONPATH": os.pathsep.join([str(SAVE_GATE_SITE), str(REPO_ROOT)]),
           "LORAFLEET_TEST_SAVE_GATE": str(gate)}
    serving.stack.add_worker(env=env)
    return serving.stack


def wait_until(condition: Callable[[], Any], what: str, timeout: float = LONG / 1000) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_bytes(jsonl_bytes(records))
    return path


def upload(tab: Console, path: Path) -> str:
    """Upload ``path`` with the page's form; returns the new file's id."""
    page = tab.page
    page.get_by_label("JSONL file").set_input_files(str(path))
    page.get_by_role("button", name="Upload").click()
    result = page.locator("#upload-result")
    expect(result).to_contain_text(f"Uploaded {path.name}", timeout=LONG)
    return str(result.locator("code").inner_text())


def logged_steps(stack: Stack, job_id: str) -> int:
    """How many training steps the job's metrics events report (what the chart should draw)."""
    events = list_all_events(stack.openai(), job_id)
    return len({e.data["step"] for e in events
                if e.type == "metrics" and e.data and "epoch" in e.data})


def assert_polls_spaced(starts: list[float], what: str) -> None:
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps and min(gaps) >= VISIBLE_POLL_MS - CLOCK_SLACK_MS, (what, gaps)


def test_a_person_trains_a_model_and_talks_to_it(
    console: Callable[..., Console], live: Stack, gate: Path, tiny_model: Path, tmp_path: Path
) -> None:
    tab = console(live.base_url)
    page = tab.page

    # ---- sign in: the front page is the console
    tab.open()
    expect(page).to_have_url(re.compile(r"/console$"))
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    tab.sign_in(live.key)
    expect(page.get_by_role("heading", name="Fine-tuning jobs", exact=True)).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('lorafleet.apiKey')") == live.key
    assert page.evaluate("localStorage.length") == 0
    tab.screenshot("jobs-empty")

    # ---- upload a validation file and a training file, fill in the form
    page.get_by_role("navigation").get_by_role("link", name="New job").click()
    expect(page.get_by_role("heading", name="New job", exact=True)).to_be_visible()
    valid_id = upload(tab, write_jsonl(tmp_path / "valid.jsonl",
                                       dialogsum_records(8, "validation")))
    train_id = upload(tab, write_jsonl(tmp_path / "train.jsonl", dialogsum_records(64)))
    expect(page.get_by_label("Training file")).to_have_value(train_id)
    page.get_by_label("Validation file").select_option(valid_id)
    page.get_by_label("Base model").fill(str(tiny_model))
    page.get_by_label("Suffix").fill("console")
    page.get_by_label("Train for").select_option("steps")
    page.get_by_label("Number of steps").fill("20")
    page.get_by_label("LoRA rank (r)").fill("4")
    page.get_by_label("LoRA alpha").fill("8")
    page.get_by_text("More settings").click()
    page.get_by_label("Checkpoint every (steps)").fill("5")
    page.get_by_label("Log the loss every (steps)").fill("1")
    page.get_by_label("Seed").fill("1234")  # the same adapter, so the same reply, every run

    # The request, to copy: the extensions in extra_body, the key never in it.
    curl = tab.text("#snippet-curl")
    python = tab.text("#snippet-python")
    sent = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1))  # type: ignore[union-attr]
    assert sent == {"model": str(tiny_model), "training_file": train_id,
                    "validation_file": valid_id, "suffix": "console", "max_steps": 20,
                    "hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 1},
                    "lora": {"r": 4, "alpha": 8}, "prompt_format": "dolly", "save_steps": 5,
                    "logging_steps": 1, "seed": 1234}
    assert "$LORAFLEET_API_KEY" in curl and live.key not in curl + python
    assert 'training_file="' in python and "extra_body={" in python
    assert '"max_steps": 20' in python and '"lora": {' in python
    tab.screenshot("new-job")

    # ---- create the job; the worker will stop inside the saves of steps 10 and 15
    (gate / "hold-10").touch()
    (gate / "hold-15").touch()
    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"), timeout=LONG)
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.get_by_role("heading", name=job_id, exact=True)).to_be_visible()
    wait_until(lambda: (gate / "waiting-10").exists(), "the worker to reach step 10")
    expect(page.locator(".page-head .badge")).to_have_text("running", timeout=LONG)
    # The chart draws every step the job logged so far (nothing is logged while it is held).
    before = logged_steps(live, job_id)
    assert before >= 1
    expect(page.locator('#loss-chart path[data-series="train"]')).to_have_attribute(
        "data-points", str(before), timeout=LONG)

    # While the job stands still the page asks for it every 2 s, for its events far less.
    since = page.evaluate("performance.now()")
    job_url = rf"/v1/fine_tuning/jobs/{job_id}$"
    events_url = rf"/v1/fine_tuning/jobs/{job_id}/events"
    page.wait_for_function(
        """([pattern, since]) => performance.getEntriesByType('resource').filter(
             e => new RegExp(pattern).test(e.name) && e.startTime > since).length >= 4""",
        arg=[job_url, since], timeout=LONG)
    polls = [t for t in tab.request_starts(job_url) if t > since]
    assert_polls_spaced(polls, "job polls")
    events = [t for t in tab.request_starts(events_url) if t > since]
    assert len(events) <= 1 + (polls[-1] - since) / EVENTS_EVERY_MS, (events, polls)
    tab.screenshot("job-running")

    # ---- a second job waits in the queue behind it: pause, resume and cancel it
    other = create_job(live.openai(), str(tiny_model), train_id, suffix="second")
    page.goto(f"{live.base_url}/console#/jobs/{other.id}")
    badge = page.locator(".page-head .badge")
    expect(badge).to_have_text("queued", timeout=LONG)
    page.get_by_role("button", name="Pause").click()
    expect(badge).to_have_text("paused", timeout=LONG)
    # With the keyboard from here: the buttons change with the status, the focus stays.
    expect(page.get_by_role("button", name="Resume")).to_be_focused()
    page.keyboard.press("Enter")
    expect(badge).to_have_text("queued", timeout=LONG)
    expect(page.get_by_role("button", name="Pause")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Enter")  # the page asks first; the test accepts
    expect(badge).to_have_text("cancelled", timeout=LONG)
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)

    # ---- back to the first job: its curve grows while it trains
    page.goto(f"{live.base_url}/console#/jobs/{job_id}")
    expect(page.locator('#loss-chart path[data-series="train"]')).to_have_attribute(
        "data-points", str(before), timeout=LONG)
    (gate / "hold-10").unlink()
    wait_until(lambda: (gate / "waiting-15").exists(), "the worker to reach step 15")
    page.wait_for_function(
        """(before) => {
             const path = document.querySelector('#loss-chart path[data-series="train"]');
             const badge = document.querySelector('.page-head .badge');
             return path && Number(path.dataset.points) > before
               && badge && badge.textContent === 'running';
           }""", arg=before, timeout=LONG)
    (gate / "hold-15").unlink()
    expect(badge).to_have_text("succeeded", timeout=LONG)
    expect(page.locator('#loss-chart path[data-series="train"]')).to_have_attribute(
        "data-points", str(logged_steps(live, job_id)), timeout=LONG)
    assert tab.points() > before
    assert tab.points("valid") >= 1
    body = tab.text("main")
    assert "Training started" in body
    assert re.search(r"\d+ \(\d+ dropped as longer than 512 tokens\)", body), body
    assert "r 4, alpha 8" in body and "dolly" in body
    expect(page.locator("table.checkpoints tbody tr").first).to_contain_text(":ckpt-step-")
    page.get_by_role("checkbox", name="Log scale").check()
    expect(page.locator("#loss-chart svg")).to_have_attribute(
        "aria-label", re.compile(r"log scale"))
    page.get_by_role("checkbox", name="Log scale").uncheck()
    tab.screenshot("job-succeeded")

    # Laptop and phone widths: nothing wider than the window but the tables, which scroll.
    for width, height in ((1024, 768), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (width, overflow)
        tab.screenshot(f"job-{width}")
    page.set_viewport_size({"width": 1280, "height": 900})

    # ---- the playground streams a reply from the new model, in its prompt format
    fine_tuned = live.openai().fine_tuning.jobs.retrieve(job_id).fine_tuned_model
    page.locator(".summary").get_by_role("link", name="Try it").click()
    expect(page.get_by_role("heading", name="Models", exact=True)).to_be_visible()
    expect(page.get_by_label("Model", exact=True)).to_have_value(fine_tuned)
    expect(page.locator("#pg-format")).to_contain_text("dolly")
    page.get_by_label("Prompt", exact=True).fill(dialogsum_records(1, "validation")[0]["dialogue"])
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Temperature").fill("0")
    # Every change of the reply while it streams, as the page shows it.
    page.evaluate("""() => {
        const reply = document.getElementById('pg-reply');
        window.seen = [];
        new MutationObserver(() => {
          if (reply.dataset.state === 'streaming') window.seen.push(reply.textContent.length);
        }).observe(reply, {childList: true, subtree: true, characterData: true});
    }""")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#pg-reply")).to_have_attribute("data-state", "done", timeout=LONG)
    expect(page.locator("#pg-status")).to_contain_text("Done")
    seen = [n for n in page.evaluate("window.seen") if n > 0]
    assert len(set(seen)) >= 2, f"the reply did not arrive in pieces: {seen}"
    assert tab.text("#pg-reply").strip()
    tab.screenshot("playground")

    # ---- the job list, filtered by status
    page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
    page.get_by_label("Status").select_option("cancelled")
    rows = page.locator("table.jobs tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job", other.id)
    expect(page).to_have_url(re.compile(r"#/jobs\?status=cancelled$"))
    page.get_by_label("Status").select_option("succeeded")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job", job_id)

    tab.assert_no_trace_shown()
    assert not tab.console_errors, tab.console_errors


# How the playground names /health's ``engine.backend``.
ENGINE_NAMES = {"vllm": "vLLM", "builtin": "the built-in engine"}


def shown_engine(tab: Console) -> tuple[str, str]:
    """The engine the Models page says serves (``data-backend``) and the reason it gives, once
    it has read /health."""
    note = tab.page.locator("#pg-engine")
    expect(note).to_have_attribute("data-backend", re.compile(r"."), timeout=LONG)
    return str(note.get_attribute("data-backend")), str(note.locator(".reason").text_content())


def test_the_playground_says_which_engine_serves_and_why(
        console: Callable[..., Console], live: Stack, serving: ServingStack) -> None:
    tab = console(live.base_url)
    tab.open("console#/models")
    tab.sign_in(live.key)
    backend, reason = shown_engine(tab)
    engine = httpx.get(f"{live.base_url}/health", timeout=30).json()["engine"]
    assert engine["status"] == "ok"
    assert (backend, reason) == (engine["backend"], engine["reason"])
    assert backend == serving.backend  # the engine the stack started, vLLM where it installs
    expect(tab.page.locator("#pg-engine strong")).to_have_text(ENGINE_NAMES[backend])
    if backend == "vllm":
        assert ".venv-vllm" in reason, reason
    tab.screenshot("engine")
    tab.assert_no_trace_shown()
    assert not tab.console_errors, tab.console_errors


def test_an_engine_that_does_not_answer_is_said_on_the_playground(
        console: Callable[..., Console], make_stack: StackFactory) -> None:
    # An API whose engine is not there: /health still answers 200 (the engine is informative).
    stack = make_stack(workers=0, settings={"engine_url": f"http://127.0.0.1:{free_port()}"})
    tab = console(stack.base_url)
    tab.open("console#/models")
    tab.sign_in(stack.key)
    backend, reason = shown_engine(tab)
    engine = httpx.get(f"{stack.base_url}/health", timeout=30).json()["engine"]
    assert engine["status"] == "unavailable" and backend == "none"
    assert reason == engine["reason"] and reason
    expect(tab.page.locator("#pg-engine")).to_contain_text("does not answer")
    tab.screenshot("engine-down")
    tab.assert_no_trace_shown()


def test_a_wrong_key_is_told_in_words(console: Callable[..., Console], live: Stack) -> None:
    tab = console(live.base_url)
    page = tab.page
    tab.open("console")
    # With the keyboard only: the title has the focus, the key field is next.
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type("lf-not-a-key")
    page.keyboard.press("Enter")
    expect(page.locator("#sign-in-error")).to_contain_text("This API key was not accepted")
    assert page.evaluate("sessionStorage.length") == 0
    assert "lf-not-a-key" not in page.url
    tab.screenshot("wrong-key")
    tab.assert_no_trace_shown()


def test_another_projects_job_is_not_found(console: Callable[..., Console], live: Stack,
                                           tiny_model: Path) -> None:
    client = live.openai()
    theirs = create_job(client, str(tiny_model), upload_dialogsum(client, 8).id)
    client.fine_tuning.jobs.cancel(theirs.id)
    tab = console(live.base_url)
    tab.open(f"console#/jobs/{theirs.id}")
    tab.sign_in(live.create_key("another-project"))
    expect(tab.page.get_by_role("heading", name="Job not found", exact=True)).to_be_visible()
    expect(tab.page.locator("main")).to_contain_text(f"Job {theirs.id} was not found")
    tab.screenshot("not-found")
    tab.assert_no_trace_shown()


def test_a_file_with_a_bad_line_shows_that_line(console: Callable[..., Console], live: Stack,
                                                tmp_path: Path) -> None:
    records: list[Any] = dialogsum_records(2)
    bad = '{"dialogue": "#Person1#: Hi.", "summery": "a typo"}'
    path = tmp_path / "typo.jsonl"
    path.write_bytes(jsonl_bytes(records) + bad.encode() + b"\n")
    tab = console(live.base_url)
    tab.open("console#/new")
    tab.sign_in(live.key)
    tab.page.get_by_label("JSONL file").set_input_files(str(path))
    tab.page.get_by_role("button", name="Upload").click()
    result = tab.page.locator("#upload-result")
    expect(result).to_contain_text("typo.jsonl was not accepted", timeout=LONG)
    expect(result).to_contain_text("line 3")
    expect(result.locator('pre.bad-line[data-line="3"]')).to_have_text(bad)
    tab.screenshot("bad-line")
    tab.assert_no_trace_shown()


def test_the_job_list_polls_every_two_seconds_at_most(console: Callable[..., Console],
                                                      live: Stack) -> None:
    tab = console(live.base_url)
    tab.open("console")
    tab.sign_in(live.key)
    expect(tab.page.locator("table.jobs tbody tr").first).to_be_visible()
    lists = r"/v1/fine_tuning/jobs\?limit=20$"
    tab.page.wait_for_function(
        """(pattern) => performance.getEntriesByType('resource').filter(
             e => new RegExp(pattern).test(e.name)).length >= 5""", arg=lists, timeout=LONG)
    polls = tab.request_starts(lists)
    assert_polls_spaced(polls, "list polls")
    # And nothing else is asked for while the list stands open.
    others = [t for t in tab.request_starts(r"/v1/") if t > polls[0]]
    assert len(others) == len([t for t in polls if t > polls[0]]), others

    # Hidden (another tab in front): no poll for HIDDEN_POLL_MS. Five quiet seconds show it on
    # any machine, since a slower one only asks less.
    assert HIDDEN_POLL_MS > 5000
    hidden_at = tab.page.evaluate("""() => {
        Object.defineProperty(document, 'visibilityState', {configurable: true,
                                                           get: () => 'hidden'});
        document.dispatchEvent(new Event('visibilitychange'));
        return performance.now();
    }""")
    tab.page.wait_for_timeout(5000)
    assert not [t for t in tab.request_starts(lists) if t > hidden_at]
    # In view again: the next poll comes at the visible pace.
    tab.page.evaluate("""() => {
        delete document.visibilityState;
        document.dispatchEvent(new Event('visibilitychange'));
    }""")
    tab.page.wait_for_function(
        """([pattern, since]) => performance.getEntriesByType('resource').some(
             e => new RegExp(pattern).test(e.name) && e.startTime > since)""",
        arg=[lists, hidden_at], timeout=LONG)


def test_a_dpo_job_shows_its_reward_curves(console: Callable[..., Console], live: Stack,
                                           tiny_model: Path) -> None:
    """A DPO job's page plots its reward margin and accuracy per step and per evaluation, and
    says which method and reference it trains with; a supervised job's page shows none."""
    from tests.support.preference import upload_preference

    client = live.openai()
    train, valid = upload_preference(client, 8), upload_preference(client, 4, offset=8)
    job = create_job(client, str(tiny_model), train.id, validation_file=valid.id,
                     method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
                     max_steps=4, save_steps=2, batch_size=2, max_length=1024)
    done = wait_until(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                      in ("succeeded", "failed") and j, f"{job.id} to end")
    assert done.status == "succeeded", done.error
    events = list_all_events(client, job.id)
    evaluated = {e.data["step"] for e in events if e.type == "metrics"
                 and "valid_rewards/margins" in (e.data or {})}
    tab = console(live.base_url)
    tab.open(f"console#/jobs/{job.id}")
    tab.sign_in(live.key)
    page = tab.page

    rewards = page.get_by_role("heading", name="Preference rewards")
    expect(rewards).to_be_visible(timeout=LONG)
    for chart in ("margin-chart", "accuracy-chart"):
        expect(page.locator(f'#{chart} path[data-series="train"]')).to_have_attribute(
            "data-points", "4", timeout=LONG)
        expect(page.locator(f'#{chart} path[data-series="valid"]')).to_have_attribute(
            "data-points", str(len(evaluated)))
    expect(page.locator("#margin-chart svg")).to_have_attribute(
        "aria-label", re.compile(r"^Reward margin curves\. Reward margin: 4 points"))
    expect(page.locator("main")).to_contain_text("DPO, beta 0.2, sigmoid loss, reference: "
                                                 "the base model")
    assert len(evaluated) == 2
    tab.screenshot("dpo-rewards")
    tab.assert_no_trace_shown()
    assert not tab.console_errors

    plain = create_job(client, str(tiny_model), upload_dialogsum(client, 4).id)
    client.fine_tuning.jobs.cancel(plain.id)
    tab.open(f"console#/jobs/{plain.id}")
    expect(page.get_by_role("heading", name="Loss")).to_be_visible(timeout=LONG)
    expect(page.locator("main")).to_contain_text("supervised")
    expect(rewards).to_be_hidden()


def test_a_person_creates_a_dpo_job_from_a_preference_file(
        console: Callable[..., Console], live: Stack, tiny_model: Path, tmp_path: Path) -> None:
    """A preference file picks DPO on the new-job form, which asks for beta and a loss type,
    sends OpenAI's method with them, and marks the method when it does not fit the file."""
    from tests.support.preference import preference_pairs

    tab = console(live.base_url)
    page = tab.page
    tab.open("console#/new")
    tab.sign_in(live.key)
    method, beta = page.get_by_label("Method", exact=True), page.get_by_label("Beta", exact=True)
    expect(method).to_have_value("supervised")
    expect(beta).to_be_hidden()

    train_id = upload(tab, write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(8)))
    expect(page.get_by_label("Training file")).to_have_value(train_id)
    expect(method).to_have_value("dpo")
    expect(page.get_by_label("Prompt format")).to_have_value("chat")  # the input is a chat
    page.get_by_label("Base model").fill(str(tiny_model))
    beta.fill("0.3")
    page.get_by_label("Train for").select_option("steps")
    page.get_by_label("Number of steps").fill("2")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("LoRA rank (r)").fill("4")
    page.get_by_label("LoRA alpha").fill("8")
    page.get_by_text("More settings").click()
    page.get_by_label("Loss type").select_option("ipo")
    page.get_by_label("Log the loss every (steps)").fill("1")
    page.get_by_label("Max length (tokens)").fill("1024")

    curl, python = tab.text("#snippet-curl"), tab.text("#snippet-python")
    sent = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1))  # type: ignore[union-attr]
    assert sent == {"model": str(tiny_model), "training_file": train_id, "max_steps": 2,
                    "method": {"type": "dpo", "dpo": {"hyperparameters": {
                        "batch_size": 2, "learning_rate_multiplier": 1, "beta": 0.3}}},
                    "lora": {"r": 4, "alpha": 8}, "prompt_format": "chat", "loss_type": "ipo",
                    "logging_steps": 1, "max_length": 1024}
    assert "    method={" in python and '"loss_type": "ipo"' in python.split("extra_body=")[1]
    tab.screenshot("new-dpo-job")

    # Supervised on preference pairs: the API refuses it, and the form marks the method.
    method.select_option("supervised")
    expect(beta).to_be_hidden()
    page.get_by_role("button", name="Create job").click()
    expect(page.locator("#create-error")).to_contain_text("preference records")
    expect(method).to_have_attribute("aria-invalid", "true")
    expect(method).to_be_focused()
    method.select_option("dpo")
    expect(beta).to_have_value("0.3")

    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"), timeout=LONG)
    job_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("main")).to_contain_text(
        "DPO, beta 0.3, ipo loss, reference: the base model", timeout=LONG)
    job = live.openai().fine_tuning.jobs.retrieve(job_id)
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.3
    expect(page.locator(".page-head .badge")).to_have_text("succeeded", timeout=LONG)
    tab.screenshot("dpo-job")
    tab.assert_no_trace_shown()
    # The browser logs the refused request; nothing else.
    assert [e for e in tab.console_errors if "status of 400" not in e] == [], tab.console_errors
