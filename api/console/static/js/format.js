// How numbers, times and statuses read on the page.

export const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed",
  "cancelled"];
export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusLabel(status) {
  return String(status).replace(/_/g, " ");
}

/** Seconds as "1 h 02 min", "3 min 05 s", "42 s". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  const secs = s % 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (hours) return `${hours} h ${pad(minutes)} min`;
  if (minutes) return `${minutes} min ${pad(secs)} s`;
  return `${secs} s`;
}

/** A Unix time in the reader's locale. */
export function time(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString();
}

/** A number with at most `digits` significant digits; "—" when missing. */
export function num(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString();
  return Number(value.toPrecision(digits)).toString();
}

/** The job's progress as a fraction in [0, 1], or null when unknown. */
export function fraction(job) {
  if (job.status === "succeeded") return 1;
  const p = job.progress;
  if (!p || !p.total_steps) return null;
  return Math.min(1, p.step / p.total_steps);
}
