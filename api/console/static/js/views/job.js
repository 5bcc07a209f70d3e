// One job: live loss curves, progress, the settings it runs with, checkpoints, events, and the
// buttons that pause, resume and cancel it.

import { api, listAll, query } from "../api.js";
import { legend, lossChart } from "../chart.js";
import { h, keepingFocus, replace } from "../dom.js";
import { TERMINAL, duration, num, statusLabel, time } from "../format.js";
import { poll } from "../poll.js";
import { etaText, progressCell, statusBadge } from "./jobs.js";

// Events are fetched when the job moved (a step, a status, a checkpoint), and at least this
// often otherwise; the job itself is polled at poll.js's intervals.
const EVENTS_EVERY_MS = 15000;
const EVENTS_SHOWN = 50;

const seqOf = (event) => Number(String(event.id).replace(/^\D*/, "")) || 0;

/** The chart's series from a job's events (oldest first): the training loss of each logged
 * step, the validation loss of each evaluation, the final full validation. For a step logged
 * twice (a retried attempt), the later event wins. */
export function lossSeries(events) {
  const train = new Map();
  const valid = new Map();
  const full = new Map();
  for (const e of events) {
    const d = e.type === "metrics" ? e.data : null;
    if (!d || !Number.isFinite(d.step)) continue;
    // A step's own metrics carry its epoch; a checkpoint's event repeats the last logged loss.
    if (typeof d.train_loss === "number" && "epoch" in d) train.set(d.step, d.train_loss);
    if (typeof d.valid_loss === "number") valid.set(d.step, d.valid_loss);
    if (typeof d.full_valid_loss === "number") full.set(d.step, d.full_valid_loss);
  }
  const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  const series = [
    { key: "train", label: "Training loss", points: sorted(train) },
    { key: "valid", label: "Validation loss", points: sorted(valid), markers: true },
  ];
  if (full.size) {
    series.push({ key: "full", label: "Full validation loss", points: sorted(full),
      markers: true });
  }
  return series;
}

/** A DPO job's reward curves from its events (oldest first): the mean reward margin of the
 * preferred over the non-preferred answers and the share of pairs where it is positive, for
 * each logged step and each evaluation. */
export function preferenceSeries(events) {
  const series = {
    margins: [["train", "Reward margin", "rewards/margins"],
      ["valid", "Validation reward margin", "valid_rewards/margins"]],
    accuracy: [["train", "Reward accuracy", "rewards/accuracies"],
      ["valid", "Validation reward accuracy", "valid_rewards/accuracies"]],
  };
  const out = {};
  for (const [chart, lines] of Object.entries(series)) {
    out[chart] = lines.map(([key, label, name]) => {
      const points = new Map();
      for (const e of events) {
        const d = e.type === "metrics" ? e.data : null;
        // A step's own metrics carry its epoch (or are an evaluation's): not a checkpoint's.
        if (!d || !Number.isFinite(d.step) || typeof d[name] !== "number") continue;
        if (key === "train" && !("epoch" in d)) continue;
        points.set(d.step, d[name]);
      }
      return { key, label, points: [...points.entries()].sort((a, b) => a[0] - b[0]),
        markers: key === "valid" };
    });
  }
  return out;
}

function methodText(job) {
  const m = job.method || {};
  if (m.type !== "dpo") return "supervised";
  const hp = (m.dpo && m.dpo.hyperparameters) || {};
  const parts = [`DPO, beta ${num(hp.beta)}, ${job.loss_type || "sigmoid"} loss`];
  if (job.rpo_alpha) parts.push(`RPO term × ${num(job.rpo_alpha)}`);
  parts.push(job.initial_model ? "reference: the model it continues"
    : "reference: the base model");
  return parts.join(", ");
}

function dl(rows) {
  return h("dl", { class: "facts" }, rows.filter(Boolean).map(([k, v]) => [
    h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "—" : v)]));
}

function promptFormatText(fmt) {
  if (!fmt) return "—";
  const parts = [fmt.type];
  if (fmt.instruction) parts.push(`instruction: "${fmt.instruction}"`);
  if (fmt.prompt_template) parts.push(`prompt: ${JSON.stringify(fmt.prompt_template)}`);
  if (fmt.response_template) parts.push(`response: ${JSON.stringify(fmt.response_template)}`);
  if (fmt.end) parts.push(`end: ${JSON.stringify(fmt.end)}`);
  return parts.join(", ");
}

function settings(job) {
  const lora = job.lora || {};
  const ds = job.dataset;
  const schedule = job.max_steps ? `${job.max_steps} steps` : `${num(job.n_epochs)} epochs`;
  return dl([
    ["Base model", job.model],
    ["Fine-tuned model", job.fine_tuned_model || "named when the job succeeds"],
    ["Method", methodText(job)],
    ["Training file", job.training_file],
    ["Validation file", job.validation_file || "none"],
    ["LoRA", `r ${lora.r}, alpha ${num(lora.alpha)}, dropout ${num(lora.dropout)}`],
    ["Target modules", lora.target_modules ? lora.target_modules.join(", ")
      : "the architecture's attention and MLP projections"],
    ["Prompt format", promptFormatText(job.prompt_format)],
    ["Schedule", `${schedule}, batch size ${job.batch_size} × ${job.gradient_accumulation_steps}` +
      ` accumulation, learning rate ${num(job.learning_rate)}`],
    ["Max length", `${job.max_length} tokens`],
    ["Training", [job.packing ? "packed batches" : "padded batches",
      job.method && job.method.type === "dpo" ? "preference pairs"
        : job.train_on_inputs ? "loss on every token" : "loss on the response only",
      job.gradient_checkpointing ? "gradient checkpointing" : null,
      job.quantization ? `${job.quantization} base model` : null].filter(Boolean).join(", ")],
    job.early_stopping_patience ? ["Early stopping", `after ${job.early_stopping_patience} ` +
      `evaluations without improvement (threshold ${num(job.early_stopping_threshold)})`] : null,
    ["Training examples", ds ? `${ds.examples.toLocaleString()} ` +
      `(${ds.dropped_too_long.toLocaleString()} dropped as longer than ${job.max_length} ` +
      "tokens)" : "counted when training starts"],
    ds && ds.validation_examples !== null && ds.validation_examples !== undefined
      ? ["Validation examples", ds.validation_examples.toLocaleString()] : null,
    ["Trainable parameters", job.trainable_parameters
      ? `${num(job.trainable_parameters)} of ${num(job.total_parameters)}` : null],
    ["Seed", String(job.seed)],
    ["Attempt", String(job.attempt)],
    job.resumed_from_step ? ["Resumed from step", String(job.resumed_from_step)] : null,
    job.initial_model ? ["Continued from", job.initial_model] : null,
    ["Trained tokens", job.trained_tokens ? num(job.trained_tokens) : null],
    ["Created", time(job.created_at)],
    ["Finished", job.finished_at ? time(job.finished_at) : null],
    job.metadata ? ["Metadata", Object.entries(job.metadata).map(([k, v]) => `${k}=${v}`)
      .join(", ")] : null,
    job.adapter_path ? ["Adapter folder", job.adapter_path] : null,
  ]);
}

function evaluationTable(ev) {
  if (!ev) return null;
  const cols = ["rouge1", "rouge2", "rougeL", "exact_match"];
  return h("section", { "aria-labelledby": "eval-title" },
    h("h2", { id: "eval-title" }, "Evaluation"),
    h("p", { class: "muted" }, `${ev.examples} validation records, up to ` +
      `${ev.max_new_tokens} new tokens, greedy.`),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Model"),
        cols.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, [["Base", ev.base], ["Fine-tuned", ev.fine_tuned]].map(([name, s]) =>
        h("tr", {}, h("th", { scope: "row" }, name), cols.map((c) => h("td", {}, num(s[c])))))))));
}

function playgroundLink(model) {
  return h("a", { href: `#/models${query({ model })}` }, "Try it");
}

export function jobView(root, jobId) {
  let job = null;
  const events = new Map();
  let checkpoints = [];
  let lastMove = "";
  let lastCheckpointKey = "";
  let eventsAt = -Infinity;
  let logScale = false;
  let allEvents = false;
  let shownStatus = null;

  const title = h("h1", { tabindex: "-1" }, jobId);
  const badge = h("span");
  const actions = h("div", { class: "actions" });
  const alert = h("p", { class: "error", role: "alert" });
  const jobError = h("div");
  const summary = h("div", { class: "summary" });
  const chartBox = h("div", { class: "chart", id: "loss-chart" });
  const chartLegend = h("div");
  const logToggle = h("input", { type: "checkbox", id: "log-scale" });
  const settingsBox = h("div");
  const evalBox = h("div");
  const ckptBody = h("tbody");
  const eventList = h("ol", { class: "events", reversed: true });
  const eventsMore = h("button", { type: "button", class: "secondary", hidden: true });
  const chart = lossChart(chartBox);
  // DPO jobs: the reward margin and accuracy, each on a chart of its own (shown once known).
  const marginBox = h("div", { class: "chart", id: "margin-chart" });
  const accuracyBox = h("div", { class: "chart", id: "accuracy-chart" });
  const marginLegend = h("div");
  const accuracyLegend = h("div");
  const rewards = h("section", { "aria-labelledby": "rewards-title", hidden: true },
    h("h2", { id: "rewards-title" }, "Preference rewards"),
    h("p", { class: "muted" }, "The policy's log-ratio over its reference model, preferred " +
      "answer minus non-preferred, times beta (the margin), and the share of pairs where it " +
      "is positive (the accuracy)."),
    marginBox, marginLegend, accuracyBox, accuracyLegend);
  const marginChart = lossChart(marginBox);
  const accuracyChart = lossChart(accuracyBox);

  replace(root,
    h("div", { class: "page-head" }, h("div", {}, h("p", { class: "crumbs" },
      h("a", { href: "#/jobs" }, "Jobs"), " / "), title, badge), actions),
    alert, jobError, summary,
    h("section", { "aria-labelledby": "loss-title" },
      h("div", { class: "section-head" }, h("h2", { id: "loss-title" }, "Loss"),
        h("span", { class: "check" }, logToggle, h("label", { for: "log-scale" }, "Log scale"))),
      chartBox, chartLegend),
    rewards,
    evalBox,
    h("section", { "aria-labelledby": "settings-title" },
      h("h2", { id: "settings-title" }, "Settings"), settingsBox),
    h("section", { "aria-labelledby": "ckpt-title" },
      h("h2", { id: "ckpt-title" }, "Checkpoints"),
      h("div", { class: "table-wrap" }, h("table", { class: "checkpoints" },
        h("thead", {}, h("tr", {}, ["Step", "Model", "Training loss", "Validation loss",
          "Token accuracy (valid)", "Saved", ""].map((c) => h("th", { scope: "col" }, c)))),
        ckptBody))),
    h("section", { "aria-labelledby": "events-title" },
      h("h2", { id: "events-title" }, "Events"), eventList, eventsMore));

  function drawChart() {
    const ordered = [...events.values()].sort((a, b) => seqOf(a) - seqOf(b));
    const series = lossSeries(ordered);
    const xMax = job && job.progress && job.progress.total_steps;
    chart.draw({ series, log: logScale, xMax });
    replace(chartLegend, legend(series));
    rewards.hidden = !(job && job.method && job.method.type === "dpo");
    if (!rewards.hidden) {
      const pref = preferenceSeries(ordered);
      marginChart.draw({ series: pref.margins, xMax, yLabel: "reward margin" });
      replace(marginLegend, legend(pref.margins));
      accuracyChart.draw({ series: pref.accuracy, xMax, yLabel: "reward accuracy" });
      replace(accuracyLegend, legend(pref.accuracy));
    }
  }

  function renderEvents() {
    const ordered = [...events.values()].sort((a, b) => seqOf(b) - seqOf(a));
    const shown = allEvents ? ordered : ordered.slice(0, EVENTS_SHOWN);
    replace(eventList, shown.length ? shown.map((e) => h("li", { class: `level-${e.level}` },
      h("time", { datetime: new Date(e.created_at * 1000).toISOString() }, time(e.created_at)),
      h("span", { class: `level level-${e.level}` }, e.level),
      h("span", { class: "message" }, e.message))) : h("li", { class: "muted" }, "No events yet."));
    eventsMore.hidden = allEvents || ordered.length <= EVENTS_SHOWN;
    replace(eventsMore, `Show all ${ordered.length} events`);
  }

  function renderCheckpoints() {
    replace(ckptBody, checkpoints.length === 0
      ? h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No checkpoint yet."))
      : checkpoints.map((c) => {
        const m = c.metrics || {};
        return h("tr", {},
          h("td", {}, String(c.step_number)),
          h("td", { class: "wrap" }, c.fine_tuned_model_checkpoint),
          h("td", {}, num(m.train_loss)),
          h("td", {}, num(m.valid_loss ?? m.full_valid_loss)),
          h("td", {}, num(m.valid_mean_token_accuracy ?? m.train_mean_token_accuracy)),
          h("td", {}, time(c.created_at)),
          h("td", {}, playgroundLink(c.fine_tuned_model_checkpoint)));
      }));
  }

  function button(label, path, confirmText) {
    return h("button", {
      type: "button", class: label === "Cancel" ? "danger" : "secondary", "data-focus": path,
      onclick: async (event) => {
        const clicked = event.currentTarget;
        // aria-disabled, not disabled: a disabled button drops the keyboard's focus.
        if (clicked.getAttribute("aria-disabled") === "true") return;
        if (confirmText && !window.confirm(confirmText)) return;
        clicked.setAttribute("aria-disabled", "true");
        alert.textContent = "";
        try {
          job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/${path}`,
            { method: "POST" });
          renderJob();
        } catch (e) {
          alert.textContent = e.message; // e.g. 409: the job ended meanwhile
        } finally {
          clicked.removeAttribute("aria-disabled"); // (replaced if the status changed)
        }
        poller.now();
      },
    }, label);
  }

  function renderJob() {
    const s = job.status;
    if (s !== shownStatus) {
      // Only when the status changed: a button that is redrawn loses the keyboard's focus.
      shownStatus = s;
      replace(badge, statusBadge(s));
      keepingFocus(actions, () => replace(actions,
        ["validating_files", "queued", "running"].includes(s) ? button("Pause", "pause") : null,
        s === "paused" ? button("Resume", "resume") : null,
        TERMINAL.has(s) ? null : button("Cancel", "cancel",
          `Cancel ${job.id}? A cancelled job cannot be resumed.`)));
    }
    const p = job.progress || {};
    replace(summary, dl([
      ["Status", statusLabel(s)],
      ["Progress", progressCell(job)],
      ["Time left", etaText(job)],
      ["Loss", num(p.loss)],
      ["Tokens per second", p.tokens_per_second ? num(p.tokens_per_second, 3) : null],
      ["Epoch", p.epoch !== undefined && p.epoch !== null ? num(p.epoch, 3) : null],
      s === "succeeded" && job.fine_tuned_model
        ? ["Fine-tuned model", h("span", {}, job.fine_tuned_model, " ",
          playgroundLink(job.fine_tuned_model))] : null,
      job.finished_at && job.created_at
        ? ["Took", duration(job.finished_at - job.created_at)] : null,
    ]));
    replace(jobError, job.error ? h("div", { class: "card error-card", role: "status" },
      h("h2", {}, "Error"), h("p", {}, job.error.message)) : null);
    replace(settingsBox, settings(job));
    replace(evalBox, evaluationTable(job.evaluation));
  }

  async function loadEvents() {
    const path = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events`;
    if (events.size === 0) {
      for (const e of await listAll(path, { maxPages: 100 })) events.set(e.id, e);
    } else {
      // Newest first: read pages until one holds an event already seen.
      let after;
      for (let page = 0; page < 100; page += 1) {
        const body = await api(path + query({ limit: 100, after }));
        let seen = false;
        for (const e of body.data) {
          if (events.has(e.id)) seen = true;
          else events.set(e.id, e);
        }
        if (seen || !body.has_more || body.data.length === 0) break;
        after = body.data[body.data.length - 1].id;
      }
    }
    eventsAt = performance.now();
    drawChart();
    renderEvents();
  }

  async function loadCheckpoints() {
    checkpoints = await listAll(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints`,
      { maxPages: 10 });
    renderCheckpoints();
  }

  async function refresh() {
    try {
      job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
    } catch (e) {
      if (e.status === 404) {
        replace(root, h("h1", { tabindex: "-1" }, "Job not found"),
          h("p", { class: "error", role: "alert" },
            `Job ${jobId} was not found in this project. It may belong to another project, ` +
            "or the id may be mistyped."),
          h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
        return false;
      }
      alert.textContent = e.message;
      return true;
    }
    renderJob();
    const p = job.progress || {};
    const move = [job.status, job.attempt, p.step].join("|");
    const checkpointKey = [job.status, job.last_good_checkpoint_step].join("|");
    try {
      if (move !== lastMove || performance.now() - eventsAt > EVENTS_EVERY_MS) {
        await loadEvents();
        lastMove = move;
      } else {
        drawChart(); // the step axis may have grown
      }
      if (checkpointKey !== lastCheckpointKey) {
        await loadCheckpoints();
        lastCheckpointKey = checkpointKey;
      }
      alert.textContent = "";
    } catch (e) {
      alert.textContent = e.message;
      return true;
    }
    // A job that ended changes no more: one last read of everything, then no polling.
    return !TERMINAL.has(job.status);
  }

  logToggle.addEventListener("change", () => {
    logScale = logToggle.checked;
    drawChart();
  });
  eventsMore.addEventListener("click", () => {
    allEvents = true;
    renderEvents();
  });
  drawChart();
  const poller = poll(refresh);
  return () => {
    poller.stop();
    chart.destroy();
    marginChart.destroy();
    accuracyChart.destroy();
  };
}
