// Small SVG charts for the dashboard: a time series line chart with axes, a sparkline and a
// connectivity timeline. No dependencies; every element is built with the DOM (no innerHTML),
// and no inline style attribute (the page's Content-Security-Policy forbids them).
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function extent(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  if (lo === hi) { lo -= 1; hi += 1; }
  return [lo, hi];
}

export function formatNumber(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e4) return String(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
  return v.toPrecision(2);
}

function formatTime(ms, spanMs) {
  const d = new Date(ms);
  if (spanMs > 2 * 86400000) {
    return d.toLocaleDateString(undefined, {month: "short", day: "numeric"}) + " " +
      d.toLocaleTimeString(undefined, {hour: "2-digit", minute: "2-digit"});
  }
  return d.toLocaleTimeString(undefined, {hour: "2-digit", minute: "2-digit",
    second: spanMs < 3600000 ? "2-digit" : undefined});
}

// A line chart of points [[ms, value], ...] over [fromMs, toMs], into `container`.
// The svg carries data-points (how many points it draws) for tests and screen readers.
export function lineChart(container, points, {fromMs, toMs, label = "", unit = ""} = {}) {
  container.textContent = "";
  const width = 640, height = 180, left = 48, right = 12, top = 12, bottom = 24;
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": `${label}: ${points.length} points`, "data-points": points.length});
  container.appendChild(svg);
  const x0 = fromMs ?? (points.length ? points[0][0] : 0);
  const x1 = toMs ?? (points.length ? points[points.length - 1][0] : 1);
  const span = Math.max(x1 - x0, 1);
  const [lo, hi] = extent(points.map(p => p[1]));
  const sx = t => left + (t - x0) / span * (width - left - right);
  const sy = v => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  // grid and axis labels
  for (let i = 0; i <= 3; i++) {
    const v = lo + (hi - lo) * i / 3, y = sy(v);
    el("line", {x1: left, x2: width - right, y1: y, y2: y, class: "grid"}, svg);
    el("text", {x: left - 6, y: y + 4, class: "axis", "text-anchor": "end"}, svg)
      .textContent = formatNumber(v);
  }
  for (let i = 0; i <= 3; i++) {
    const t = x0 + span * i / 3;
    el("text", {x: sx(t), y: height - 6, class: "axis",
      "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle"}, svg)
      .textContent = formatTime(t, span);
  }
  if (!points.length) {
    el("text", {x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle"}, svg)
      .textContent = "no readings in this range";
    return svg;
  }
  const d = points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " +
    sy(p[1]).toFixed(1)).join(" ");
  el("path", {d, class: "line"}, svg);
  if (points.length <= 120) {
    for (const [t, v] of points) {
      const c = el("circle", {cx: sx(t).toFixed(1), cy: sy(v).toFixed(1), r: 2, class: "point"}, svg);
      el("title", {}, c).textContent = `${formatTime(t, 0)}  ${formatNumber(v)}${unit}`;
    }
  }
  // a hover read-out: the nearest point's time and value
  const cursor = el("line", {y1: top, y2: height - bottom, class: "cursor", visibility: "hidden"}, svg);
  const readout = el("text", {x: width - right, y: top + 10, class: "readout", "text-anchor": "end"}, svg);
  svg.addEventListener("mousemove", event => {
    const box = svg.getBoundingClientRect();
    const t = x0 + ((event.clientX - box.left) / box.width * width - left) /
      (width - left - right) * span;
    let best = points[0];
    for (const p of points) if (Math.abs(p[0] - t) < Math.abs(best[0] - t)) best = p;
    cursor.setAttribute("x1", sx(best[0])); cursor.setAttribute("x2", sx(best[0]));
    cursor.setAttribute("visibility", "visible");
    readout.textContent = `${formatTime(best[0], 0)}  ${formatNumber(best[1])}${unit}`;
  });
  svg.addEventListener("mouseleave", () => {
    cursor.setAttribute("visibility", "hidden"); readout.textContent = "";
  });
  return svg;
}

// A sparkline of values (oldest first).
export function sparkline(container, values) {
  container.textContent = "";
  const width = 160, height = 36;
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, class: "sparkline",
    "data-points": values.length, "aria-hidden": "true"}, container);
  if (values.length < 2) return svg;
  const [lo, hi] = extent(values);
  const sx = i => i / (values.length - 1) * (width - 4) + 2;
  const sy = v => 2 + (1 - (v - lo) / (hi - lo)) * (height - 4);
  el("path", {d: values.map((v, i) => (i ? "L" : "M") + sx(i).toFixed(1) + " " +
    sy(v).toFixed(1)).join(" "), class: "line"}, svg);
  return svg;
}

// Online/offline segments [{from, to, online}] over [fromMs, toMs] as one bar.
export function timeline(container, segments, fromMs, toMs) {
  container.textContent = "";
  const width = 1200, height = 40, span = Math.max(toMs - fromMs, 1);
  const svg = el("svg", {viewBox: `0 0 ${width} ${height}`, class: "timeline-bar",
    "data-segments": segments.length}, container);
  const sx = t => (Math.min(Math.max(t, fromMs), toMs) - fromMs) / span * width;
  el("rect", {x: 0, y: 4, width, height: 16, class: "unknown"}, svg);
  for (const s of segments) {
    const x = sx(s.from), w = Math.max(sx(s.to) - x, 1);
    const r = el("rect", {x, y: 4, width: w, height: 16, class: s.online ? "online" : "offline"}, svg);
    el("title", {}, r).textContent = `${s.online ? "online" : "offline"} from ` +
      `${new Date(s.from).toLocaleString()} to ${new Date(s.to).toLocaleString()}`;
  }
  el("text", {x: 0, y: 36, class: "axis"}, svg).textContent = formatTime(fromMs, span);
  el("text", {x: width, y: 36, class: "axis", "text-anchor": "end"}, svg).textContent = "now";
  return svg;
}
