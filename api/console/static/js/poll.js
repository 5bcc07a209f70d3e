// Bounded polling. A view refreshes at most once every VISIBLE_MS while the page is in view and
// once every HIDDEN_MS while it is hidden (another tab, a minimised window); a refresh starts
// only after the previous one finished, so a slow API is never asked twice at once. The API
// reuses a job's status answer for a quarter of a second (LORAFLEET_STATUS_CACHE_SECONDS), far
// below these intervals, so the console never asks faster than that cache can answer.

export const VISIBLE_MS = 2000;
export const HIDDEN_MS = 30000;

/**
 * Call `refresh()` now, then again every `visibleMs` (or `hiddenMs` while hidden) after the
 * start of the previous call, never before it ended. Returns {stop, now}: `now()` refreshes
 * at once (after a click), `stop()` ends the polling. `refresh` may return false to stop.
 */
export function poll(refresh, { visibleMs = VISIBLE_MS, hiddenMs = HIDDEN_MS } = {}) {
  let timer = null;
  let running = false;
  let stopped = false;
  let again = false;
  let lastStart = -Infinity;

  const interval = () => (document.visibilityState === "hidden" ? hiddenMs : visibleMs);

  function schedule() {
    clearTimeout(timer);
    if (stopped) return;
    const wait = Math.max(0, lastStart + interval() - performance.now());
    timer = setTimeout(run, wait);
  }

  async function run() {
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    lastStart = performance.now();
    let keep = true;
    try {
      keep = (await refresh()) !== false;
    } catch {
      // The view shows its own errors; polling goes on (the API may come back).
    } finally {
      running = false;
    }
    if (!keep) {
      end();
      return;
    }
    if (again) {
      again = false;
      run();
    } else {
      schedule();
    }
  }

  function end() {
    stopped = true;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisibility);
  }

  function onVisibility() {
    if (!running) schedule();
  }

  document.addEventListener("visibilitychange", onVisibility);
  run();
  return {
    now() {
      if (stopped) return;
      clearTimeout(timer);
      run();
    },
    stop: end,
  };
}
