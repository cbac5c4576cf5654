// A small SVG line chart: lineChart(container, [{name, color, points: [[x, y], ...]}], {yLabel}).
// Hand-written for the studio (no library, nothing from a CDN); redrawn whole on each update.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

function fmt(v) {
  if (Number.isInteger(v)) return String(v);
  if (Math.abs(v) >= 1000) return v.toFixed(0);
  if (Math.abs(v) >= 10) return v.toFixed(1);
  return +v.toPrecision(3) + "";
}

function lineChart(container, series, opts) {
  const W = 520, H = 260, L = 56, R = 12, T = 12, B = 34;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  container.textContent = "";
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "linechart", role: "img",
    "aria-label": (opts && opts.label) || "chart" });
  container.appendChild(svg);
  if (!all.length) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return svg;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.appendChild(svgEl("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 5)) {
    if (t < x0 || t > x1) continue;
    svg.appendChild(svgEl("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle", class: "tick" }, fmt(t)));
  }
  svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" },
    (opts && opts.xLabel) || "step"));
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) return;
    const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    svg.appendChild(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, class: "series",
      "data-name": s.name, "data-points": pts.length }));
    if (pts.length < 30) {
      for (const p of pts) svg.appendChild(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color }));
    }
    svg.appendChild(svgEl("rect", { x: L + 10 + i * 110, y: T + 2, width: 10, height: 10, fill: s.color }));
    svg.appendChild(svgEl("text", { x: L + 24 + i * 110, y: T + 11, class: "legend" },
      `${s.name} ${fmt(pts[pts.length - 1][1])}`));
  });
  return svg;
}

window.lineChart = lineChart;
