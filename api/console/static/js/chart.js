// The loss chart: training loss per logged step and validation loss per evaluation, drawn as
// SVG (no charting library to ship). Each series' path carries data-points, the number of
// points drawn, which the browser tests read. The same chart plots other per-step metrics (a
// DPO job's reward margins and accuracies) with another axis label.

import { h, svg, replace } from "./dom.js";
import { num } from "./format.js";

const HEIGHT = 280;
const MARGIN = { left: 60, right: 16, top: 14, bottom: 40 };

/** Round tick values covering [lo, hi]: 1, 2 or 5 times a power of ten apart. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const range = hi - lo;
  let step = 10 ** Math.floor(Math.log10(range / count));
  const err = (count / range) * step;
  if (err <= 0.15) step *= 10;
  else if (err <= 0.35) step *= 5;
  else if (err <= 0.75) step *= 2;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

/** Tick values for a log axis over [10^lo, 10^hi] (lo, hi in log10). */
function logTicks(lo, hi) {
  if (hi - lo < 1) return niceTicks(10 ** lo, 10 ** hi).filter((v) => v > 0);
  const ticks = [];
  const mantissas = hi - lo > 3 ? [1] : [1, 2, 5];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e += 1) {
    for (const m of mantissas) {
      const v = m * 10 ** e;
      const l = Math.log10(v);
      if (l >= lo - 1e-9 && l <= hi + 1e-9) ticks.push(v);
    }
  }
  return ticks;
}

function extent(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/**
 * A chart in `container`. `draw({series, log, xMax, yLabel})` redraws it: series are
 * {key, label, points: [[step, loss], ...], markers: bool}; `log` plots the loss on a log10
 * scale; `xMax` (the job's total steps) fixes the step axis so it does not move as points come;
 * `yLabel` names what is plotted (default "loss").
 */
export function lossChart(container) {
  let last = null;
  let drawnWidth = 0;
  let frame = 0;
  // Redrawn when the width changes, in the next frame: drawing inside the observer's callback
  // would resize what it observes again ("ResizeObserver loop" errors).
  const observer = new ResizeObserver(() => {
    if (!last || container.clientWidth === drawnWidth) return;
    cancelAnimationFrame(frame);
    frame = requestAnimationFrame(() => draw(last));
  });
  observer.observe(container);

  function draw(state) {
    last = state;
    const { series, log, xMax } = state;
    const yLabel = state.yLabel || "loss";
    drawnWidth = container.clientWidth;
    const width = Math.max(280, drawnWidth || 640);
    const plotW = width - MARGIN.left - MARGIN.right;
    const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
    const usable = series.map((s) => ({
      ...s,
      points: s.points.filter(([, y]) => Number.isFinite(y) && (!log || y > 0)),
    }));
    const all = usable.flatMap((s) => s.points);
    const root = svg("svg", {
      viewBox: `0 0 ${width} ${HEIGHT}`, width, height: HEIGHT, role: "img",
      "aria-label": summary(usable, log, yLabel),
    });
    if (all.length === 0) {
      root.append(svg("text", { x: width / 2, y: HEIGHT / 2, "text-anchor": "middle",
        class: "chart-empty" }, `No ${yLabel} logged yet`));
      replace(container, root);
      return;
    }
    const tf = log ? Math.log10 : (v) => v;
    const [xLo0, xHi0] = extent(all.map(([x]) => x));
    const xLo = Math.min(0, xLo0);
    const xHi = Math.max(xHi0, xMax || 0, xLo + 1);
    let [yLo, yHi] = extent(all.map(([, y]) => tf(y)));
    if (yHi - yLo < 1e-9) {
      yLo -= log ? 0.05 : Math.abs(yLo) * 0.05 || 0.5;
      yHi += log ? 0.05 : Math.abs(yHi) * 0.05 || 0.5;
    }
    const pad = (yHi - yLo) * 0.06;
    yLo -= pad;
    yHi += pad;
    if (!log && yLo < 0 && extent(all.map(([, y]) => y))[0] >= 0) yLo = 0;
    const x = (v) => MARGIN.left + ((v - xLo) / (xHi - xLo)) * plotW;
    const y = (v) => MARGIN.top + (1 - (tf(v) - yLo) / (yHi - yLo)) * plotH;

    const grid = svg("g", { class: "chart-grid" });
    const yTicks = log ? logTicks(yLo, yHi) : niceTicks(yLo, yHi);
    for (const t of yTicks) {
      const py = y(t);
      grid.append(
        svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: py, y2: py }),
        svg("text", { x: MARGIN.left - 6, y: py + 4, "text-anchor": "end" }, num(t, 3)),
      );
    }
    for (const t of niceTicks(xLo, xHi, Math.max(2, Math.floor(plotW / 90)))) {
      if (!Number.isInteger(t)) continue;
      const px = x(t);
      grid.append(
        svg("line", { x1: px, x2: px, y1: MARGIN.top, y2: MARGIN.top + plotH }),
        svg("text", { x: px, y: HEIGHT - MARGIN.bottom + 16, "text-anchor": "middle" },
          String(t)),
      );
    }
    grid.append(
      svg("text", { x: MARGIN.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle",
        class: "chart-axis-label" }, "step"),
      svg("text", { x: 12, y: MARGIN.top + plotH / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${MARGIN.top + plotH / 2})`, class: "chart-axis-label" },
      log ? `${yLabel} (log scale)` : yLabel),
    );
    root.append(grid);

    for (const s of usable) {
      const d = s.points.map(([px, py], i) => `${i ? "L" : "M"}${x(px).toFixed(1)},` +
        `${y(py).toFixed(1)}`).join("");
      const g = svg("g", { class: `chart-series series-${s.key}` });
      g.append(svg("path", { d: d || "M0,0", "data-series": s.key,
        "data-points": s.points.length, fill: "none" }));
      if (s.markers || s.points.length === 1) {
        for (const [px, py] of s.points) {
          g.append(svg("circle", { cx: x(px), cy: y(py), r: 3.5 },
            svg("title", {}, `${s.label} at step ${px}: ${num(py)}`)));
        }
      }
      root.append(g);
    }
    replace(container, root);
  }

  return {
    draw,
    destroy() {
      observer.disconnect();
      cancelAnimationFrame(frame);
    },
  };
}

function summary(series, log, yLabel) {
  const parts = series.map((s) => {
    if (s.points.length === 0) return `${s.label}: no points`;
    const [step, loss] = s.points[s.points.length - 1];
    return `${s.label}: ${s.points.length} points, ${num(loss)} at step ${step}`;
  });
  const what = yLabel.charAt(0).toUpperCase() + yLabel.slice(1);
  return `${what} curves${log ? " (log scale)" : ""}. ${parts.join("; ")}.`;
}

/** The legend: one entry per series, with its latest value. */
export function legend(series) {
  return h("ul", { class: "legend" }, series.map((s) => {
    const lastPoint = s.points[s.points.length - 1];
    return h("li", {},
      h("span", { class: `swatch series-${s.key}`, "aria-hidden": "true" }),
      `${s.label}: `,
      lastPoint ? `${num(lastPoint[1])} at step ${lastPoint[0]}` : "none yet");
  }));
}
