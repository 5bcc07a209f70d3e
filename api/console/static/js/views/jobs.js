// The job list: status, progress and time left, refreshed by a bounded poll; filtered by status
// (on the page: the API lists jobs newest first without a status filter).

import { api, query } from "../api.js";
import { h, keepingFocus, replace } from "../dom.js";
import { STATUSES, duration, fraction, statusLabel, time } from "../format.js";
import { poll } from "../poll.js";

const PAGE = 20;
const MAX_LISTED = 100; // what one request may ask for

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, statusLabel(status));
}

export function progressCell(job) {
  const f = fraction(job);
  const p = job.progress;
  const steps = p && p.total_steps ? `${p.step} / ${p.total_steps} steps` : "";
  if (f === null) return h("span", { class: "muted" }, steps || "—");
  return h("span", { class: "progress-cell" },
    h("progress", { max: 1, value: f, "aria-label": `${Math.round(f * 100)}%` }),
    h("span", {}, `${Math.round(f * 100)}%`), steps ? h("span", { class: "muted" }, steps) : null);
}

export function etaText(job) {
  if (job.status !== "running") return "—";
  const eta = job.progress && job.progress.eta_seconds;
  return eta === null || eta === undefined ? "estimating…" : duration(eta);
}

export function jobsView(root, params) {
  let wanted = params.get("status") || "";
  let limit = PAGE;
  let jobs = [];
  let hasMore = false;

  const filter = h("select", { id: "status-filter", name: "status" },
    h("option", { value: "" }, "All"),
    STATUSES.map((s) => h("option", { value: s, selected: s === wanted }, statusLabel(s))));
  const error = h("p", { class: "error", role: "alert" });
  const body = h("tbody");
  const caption = h("caption", { class: "muted" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Show more");
  const table = h("div", { class: "table-wrap" },
    h("table", { class: "jobs" }, caption,
      h("thead", {}, h("tr", {},
        // Status and progress first: on a phone they are what fits before the table scrolls.
        ["Job", "Status", "Progress", "Time left", "Model", "Created"].map(
          (c) => h("th", { scope: "col" }, c)))),
      body));

  replace(root,
    h("div", { class: "page-head" },
      h("h1", { tabindex: "-1" }, "Fine-tuning jobs"),
      h("a", { class: "button", href: "#/new" }, "New job")),
    h("div", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status"), filter),
    error, table, more);

  function render() {
    const shown = wanted ? jobs.filter((j) => j.status === wanted) : jobs;
    replace(caption, wanted
      ? `${shown.length} ${statusLabel(wanted)} among the latest ${jobs.length} jobs`
      : `The latest ${jobs.length === 1 ? "job" : `${jobs.length} jobs`}`);
    keepingFocus(body, () => replace(body, shown.length === 0
      ? h("tr", {}, h("td", { colspan: 6, class: "muted" },
        jobs.length ? "No job with this status." : "No jobs yet."))
      : shown.map((j) => h("tr", { dataset: { job: j.id, status: j.status } },
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}`,
          "data-focus": j.id }, j.id)),
        h("td", {}, statusBadge(j.status)),
        h("td", {}, progressCell(j)),
        h("td", {}, etaText(j)),
        h("td", { class: "wrap" }, j.fine_tuned_model || j.model),
        h("td", {}, time(j.created_at))))));
    more.hidden = !hasMore || limit >= MAX_LISTED;
  }

  async function refresh() {
    try {
      const page = await api(`/v1/fine_tuning/jobs${query({ limit })}`);
      jobs = page.data;
      hasMore = page.has_more;
      error.textContent = "";
      render();
    } catch (e) {
      error.textContent = e.message;
    }
  }

  const poller = poll(refresh);
  filter.addEventListener("change", () => {
    wanted = filter.value;
    // The filter goes in the address so that a reload or a shared link keeps it.
    history.replaceState(null, "", `#/jobs${query({ status: wanted })}`);
    render();
  });
  more.addEventListener("click", () => {
    limit = Math.min(MAX_LISTED, limit + PAGE);
    poller.now();
  });
  return () => poller.stop();
}
