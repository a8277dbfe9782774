// The built-in dashboard: reads from this gateway (/api/v1), writes (acknowledge, commands)
// through the command API, follows /stream for live changes. Plain ES modules, no build step.
"use strict";

import {formatNumber, lineChart, sparkline, timeline} from "/ui/chart.js";

const API = "/api/v1";
const TOKEN_KEY = "iot-token";
const SPARK_KEY = "iot-rpm";
const PAGE_SIZE = 25;
const RANGES = {  // range -> [milliseconds, downsampling interval]: ~200 points a metric
  "15m": [15 * 60e3, "5s"], "1h": [3600e3, "20s"], "6h": [6 * 3600e3, "2m"],
  "24h": [86400e3, "5m"], "7d": [7 * 86400e3, "1h"], "30d": [30 * 86400e3, "3h"],
};

const $ = id => document.getElementById(id);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  me: null,            // {name, role}
  commandsUrl: null,   // the command API's base URL (…/api/v1)
  view: null,          // the current view's {name, refresh(deviceId?)}
  stream: null,        // AbortController of the /stream request
  range: "1h",
};

// ------------------------------------------------------------------ HTTP

class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail || title || `HTTP ${status}`);
    this.status = status; this.title = title;
  }
}

async function failure(response) {
  let title = response.statusText, detail = "";
  try {
    const body = await response.json();
    title = body.title || title; detail = body.detail || "";
  } catch { /* not problem+json */ }
  return new ApiError(response.status, title, detail);
}

function authHeaders(extra = {}) {
  return {Authorization: "Bearer " + state.token, ...extra};
}

async function get(path, params = {}, headers = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach(x => query.append(k, x));
    else if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const url = API + path + (query.toString() ? "?" + query : "");
  const response = await fetch(url, {headers: authHeaders(headers)});
  if (response.status === 401) { signOut("Your token is no longer accepted: sign in again."); }
  if (!response.ok) throw await failure(response);
  return response.json();
}

function randomKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
}

// A change through the command API; answers {body, position} (position: its Iot-Position,
// to read the gateway's views once they include the change).
async function post(path, body) {
  const response = await fetch(state.commandsUrl + path, {
    method: "POST",
    headers: authHeaders({"Content-Type": "application/json", "Idempotency-Key": randomKey()}),
    body: JSON.stringify(body ?? {}),
  });
  if (!response.ok) throw await failure(response);
  return {body: await response.json(), position: response.headers.get("Iot-Position")};
}

// ------------------------------------------------------------------ small DOM helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function table(columns, rows, {empty = "Nothing here yet.", rowAttrs = () => ({})} = {}) {
  if (!rows.length) return h("p", {class: "empty"}, empty);
  return h("table", {class: "list"},
    h("thead", {}, h("tr", {}, columns.map(c => h("th", {}, c.label)))),
    h("tbody", {}, rows.map(r => h("tr", rowAttrs(r), columns.map(c => h("td", {}, c.cell(r)))))));
}

function loading(container) {
  container.replaceChildren(h("p", {class: "loading"}, "Loading…"));
}

function failed(container, error) {
  container.replaceChildren(h("p", {class: "error"}, "Could not load: " + error.message));
}

function badge(text, kind = text) {
  return h("span", {class: "badge " + kind}, text);
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function when(iso) {
  return iso ? h("time", {datetime: iso, title: iso}, new Date(iso).toLocaleString()) : "–";
}

function json(value) {
  return value === undefined || value === null ? "–" : h("code", {}, JSON.stringify(value));
}

function keyValues(object, empty) {
  const entries = Object.entries(object || {});
  if (!entries.length) return h("p", {class: "empty"}, empty);
  return h("dl", {class: "kv"}, entries.map(([k, v]) => [h("dt", {}, k),
    h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]));
}

let bannerTimer = null;
function banner(message, kind = "error") {
  $("banner-text").textContent = message;
  $("banner").className = "banner " + kind;
  $("banner").hidden = false;
  clearTimeout(bannerTimer);
  if (kind !== "error") bannerTimer = setTimeout(() => { $("banner").hidden = true; }, 4000);
}

function canWrite() {
  return state.me && state.me.role !== "viewer";
}

// Runs fn at most once per `ms`, the last call winning (live refreshes).
function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// ------------------------------------------------------------------ sign-in

async function signIn(token) {
  state.token = token;
  const me = await get("/me");
  state.me = me;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("who-name").textContent = me.name;
  $("who-role").textContent = me.role;
  $("who-role").className = "badge role-" + me.role;
  document.body.classList.toggle("read-only", me.role === "viewer");
  $("nav").hidden = false; $("who").hidden = false;
  follow();
}

function signOut(message = "") {
  state.token = ""; state.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.stream) { state.stream.abort(); state.stream = null; }
  $("nav").hidden = true; $("who").hidden = true;
  $("signin-error").textContent = message;
  show("signin");
}

$("signin-form").addEventListener("submit", async event => {
  event.preventDefault();
  const token = $("signin-token").value.trim();
  $("signin-error").textContent = "";
  $("signin-submit").disabled = true;
  try {
    await signIn(token);
    $("signin-token").value = "";
    route();
  } catch (e) {
    state.token = "";
    $("signin-error").textContent = e.status === 401 ? "That token is not accepted." :
      "Could not sign in: " + e.message;
  } finally {
    $("signin-submit").disabled = false;
  }
});
$("sign-out").addEventListener("click", () => signOut());
$("banner-close").addEventListener("click", () => { $("banner").hidden = true; });

// ------------------------------------------------------------------ live: /stream

async function follow() {
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  let delay = 1000;
  while (!controller.signal.aborted) {
    try {
      const response = await fetch(API + "/stream", {headers: authHeaders(),
        signal: controller.signal});
      if (response.status === 401) { signOut("Your token is no longer accepted."); return; }
      if (!response.ok || !response.body) throw new Error("stream " + response.status);
      $("live").className = "live on";
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {done, value} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
          const data = block.split("\n").find(l => l.startsWith("data: "));
          if (block.includes("event: change") && data) {
            try { changed(JSON.parse(data.slice(6)).device_id); } catch { /* skip */ }
          }
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    $("live").className = "live off";
    await new Promise(ok => setTimeout(ok, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function changed(deviceId) {
  if (state.view && state.view.changed) state.view.changed(deviceId);
}

// ------------------------------------------------------------------ views and routing

function show(name) {
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + name;
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("current", link.dataset.nav === name ||
      (name === "device" && link.dataset.nav === "devices"));
  }
}

async function route() {
  if (!state.me) { show("signin"); return; }
  if (state.view && state.view.leave) state.view.leave();
  const hash = location.hash.replace(/^#\/?/, "");
  const [first, ...rest] = hash.split("/");
  let view;
  if (first === "" ) view = overview();
  else if (first === "devices" && rest.length) view = devicePage(decodeURIComponent(rest.join("/")));
  else if (first === "devices") view = deviceList();
  else if (first === "alerts") view = alertList();
  else {
    view = {name: "missing", refresh() { $("missing-text").textContent = `No page ${hash}.`; }};
  }
  state.view = view;
  show(view.name);
  await view.refresh();
}
window.addEventListener("hashchange", route);

// --- overview

function overview() {
  const samples = JSON.parse(sessionStorage.getItem(SPARK_KEY) || "[]");
  let timer = null;
  async function refresh() {
    try {
      const f = await get("/fleet");
      $("fleet-devices").textContent = f.devices;
      $("fleet-statuses").replaceChildren(...Object.entries(f.by_status)
        .filter(([, n]) => n).map(([s, n]) => h("span", {class: "st " + s}, `${n} ${s}`)));
      $("fleet-online").textContent = f.online;
      $("fleet-online-share").textContent = f.devices ?
        `${Math.round(100 * f.online / f.devices)}% of devices` : "";
      $("fleet-rpm").textContent = formatNumber(f.readings_last_minute);
      samples.push(f.readings_last_minute);
      while (samples.length > 60) samples.shift();
      sessionStorage.setItem(SPARK_KEY, JSON.stringify(samples));
      sparkline($("fleet-spark"), samples);
      const open = f.alerts_open || {};
      const total = Object.values(open).reduce((a, b) => a + b, 0);
      $("fleet-alerts").textContent = total;
      $("fleet-severities").replaceChildren(...["critical", "warning", "info"].map(s =>
        h("span", {class: "sev " + s, "data-severity": s}, `${open[s] || 0} ${s}`)));
      $("fleet-pending").textContent = f.commands_pending;
      navAlerts(total);
    } catch (e) { banner("Fleet: " + e.message); }
    const alerts = $("overview-alerts");
    try {
      const page = await get("/alerts", {status: "active", limit: 10});
      alerts.replaceChildren(alertTable(page.items, () => refresh(),
        "No open alerts."));
    } catch (e) { failed(alerts, e); }
    const devices = $("overview-devices");
    try {
      const page = await get("/devices", {limit: 10});
      devices.replaceChildren(deviceTable(page.items,
        "No devices yet: register one through the command API or run `iot simulate`."));
    } catch (e) { failed(devices, e); }
  }
  const live = debounce(refresh, 2000);
  timer = setInterval(refresh, 5000);
  return {name: "overview", refresh, changed: live, leave() { clearInterval(timer); }};
}

function navAlerts(open) {
  $("nav-alerts").textContent = open;
  $("nav-alerts").hidden = !open;
}

// --- device list

function deviceTable(items, empty) {
  return table([
    {label: "Device", cell: d => h("a", {href: "#/devices/" + encodeURIComponent(d.device_id),
      class: "device-link"}, d.device_id)},
    {label: "Name", cell: d => d.name},
    {label: "Type", cell: d => d.type},
    {label: "Labels", cell: d => Object.entries(d.labels || {}).map(([k, v]) =>
      h("span", {class: "label"}, `${k}:${v}`))},
    {label: "Status", cell: d => badge(d.status)},
    {label: "Connection", cell: d => d.online ? badge("online") : badge("offline")},
    {label: "Last seen", cell: d => h("span", {title: d.last_seen || ""}, ago(d.last_seen))},
  ], items, {empty, rowAttrs: d => ({"data-device": d.device_id})});
}

function deviceList() {
  const cursors = [null];  // the cursor of each page shown so far
  let page = 0;
  const form = $("device-filters");
  form.onsubmit = event => { event.preventDefault(); cursors.length = 1; page = 0; refresh(); };
  $("page-prev").onclick = () => { page -= 1; refresh(); };
  $("page-next").onclick = () => { page += 1; refresh(); };
  async function refresh() {
    const list = $("device-list");
    if (!list.firstChild) loading(list);
    const label = $("filter-label").value.trim();
    try {
      const result = await get("/devices", {
        prefix: $("filter-prefix").value.trim(), status: $("filter-status").value,
        label: label ? [label] : [], cursor: cursors[page], limit: PAGE_SIZE,
      });
      cursors[page + 1] = result.next_cursor;
      const filtered = $("filter-prefix").value || $("filter-status").value || label;
      list.replaceChildren(deviceTable(result.items, filtered ? "No devices match." :
        "No devices yet: register one through the command API or run `iot simulate`."));
      $("page-prev").disabled = page === 0;
      $("page-next").disabled = !result.next_cursor;
      $("page-info").textContent = result.items.length ?
        `page ${page + 1}` : "";
    } catch (e) { failed(list, e); }
  }
  const live = debounce(id => {
    if (document.querySelector(`#device-list tr[data-device="${CSS.escape(id)}"]`)) refresh();
  }, 1000);
  return {name: "devices", refresh, changed: live};
}

// --- one device

function devicePage(deviceId) {
  let historyCursor = null;
  const views = {};
  async function refresh(after = null) {
    let d;
    try {
      d = await get("/devices/" + encodeURIComponent(deviceId), {},
        after ? {"Iot-After": after} : {});
    } catch (e) {
      if (e.status === 404) {
        show("missing"); $("missing-text").textContent = `There is no device ${deviceId}.`;
        return;
      }
      banner(`Device ${deviceId}: ${e.message}`); return;
    }
    $("device-title").textContent = d.name ? `${d.name} (${d.device_id})` : d.device_id;
    $("device-status").replaceWith(Object.assign(badge(d.status), {id: "device-status"}));
    $("device-online").replaceWith(Object.assign(badge(d.online ? "online" : "offline"),
      {id: "device-online"}));
    $("device-seen").textContent = "last seen " + ago(d.last_seen);
    $("device-meta").textContent = `type ${d.type} · registered ` +
      new Date(d.registered_at).toLocaleString() + ` · version ${d.version}` +
      (Object.keys(d.labels || {}).length ? " · " + Object.entries(d.labels)
        .map(([k, v]) => `${k}:${v}`).join(", ") : "");
    // twin
    $("twin-sync").textContent = `desired version ${d.desired.version}, device applied ` +
      `${d.reported_config_version ?? "none"}: ` + (d.in_sync ? "in sync" : "not in sync yet");
    $("twin-desired").replaceChildren(keyValues(d.desired.config, "No desired configuration."));
    $("twin-reported").replaceChildren(keyValues(d.reported, "Nothing reported yet."));
    $("twin-delta").replaceChildren(keyValues(d.delta, "No difference."));
    // alerts
    $("device-alerts").replaceChildren(alertTable(d.alerts.map(a => ({...a, device_id: deviceId,
      raised_at_ms: Date.parse(a.raised_at)})), position => refresh(position),
      "No open alerts."));
    // commands
    const commands = [
      ...d.pending_commands.map(c => ({...c, when: c.requested_at, outcome: "–"})),
      ...d.recent_commands.map(c => ({...c, when: c.finished_at,
        outcome: c.result !== undefined ? c.result : c.reason})),
    ];
    $("device-commands").replaceChildren(table([
      {label: "Command", cell: c => h("code", {}, c.command_id)},
      {label: "Name", cell: c => c.name ?? "–"},
      {label: "State", cell: c => badge(c.state)},
      {label: "When", cell: c => when(c.when)},
      {label: "Result / reason", cell: c => json(c.outcome === "–" ? null : c.outcome)},
    ], commands, {empty: "No commands yet.", rowAttrs: c => ({"data-command": c.command_id,
      "data-state": c.state})}));
    const sent = $("command-result").dataset.command;
    if (sent) {
      const c = commands.find(x => x.command_id === sent);
      if (c) $("command-result").textContent = `${sent}: ${c.state}`;
    }
    views.device = d;
  }

  async function charts() {
    const [span, every] = RANGES[state.range];
    for (const b of document.querySelectorAll("#ranges button")) {
      b.classList.toggle("current", b.dataset.range === state.range);
    }
    const to = Date.now(), from = to - span;
    const box = $("charts");
    if (!box.firstChild) loading(box);
    let answer;
    try {
      answer = await telemetry(from, to, every);
    } catch (e) { failed(box, e); return; }
    const names = Object.keys(answer.series).filter(m =>
      answer.series[m].some(p => typeof p[1] === "number")).sort();
    if (!names.length) {
      box.replaceChildren(h("p", {class: "empty"}, "No numeric readings in this range."));
      return;
    }
    box.replaceChildren(...names.map(m => {
      const card = h("div", {class: "card chart-card", "data-metric": m},
        h("h3", {}, m, h("span", {class: "muted"}, ` ${answer.every ? answer.agg + " per " +
          answer.every : "raw"}${answer.source && answer.source !== "raw" ? " · " +
          answer.source : ""}`)));
      const plot = h("div", {class: "plot"});
      card.append(plot);
      lineChart(plot, answer.series[m].filter(p => typeof p[1] === "number"),
        {fromMs: from, toMs: to, label: m});
      return card;
    }));
    connectivity(from, to);
  }

  async function telemetry(from, to, every) {
    try {
      return await get(`/devices/${encodeURIComponent(deviceId)}/telemetry`,
        {from, to, every, agg: "mean"});
    } catch (e) {
      const hint = /every=?\s*([0-9]+[smhdw])/.exec(e.message);
      if (e.status === 400 && hint) {
        return get(`/devices/${encodeURIComponent(deviceId)}/telemetry`,
          {from, to, every: hint[1], agg: "mean"});
      }
      throw e;
    }
  }

  async function connectivity(from, to) {
    const box = $("timeline");
    try {
      const base = `/devices/${encodeURIComponent(deviceId)}/history`;
      // The state at the range's start: a device starts offline when it is registered.
      const registered = views.device ? Date.parse(views.device.registered_at) : from;
      const [page, before] = await Promise.all([
        get(base, {types: "connected,disconnected", from, limit: 500}),
        registered < from ? get(base, {as_of: from}).catch(() => null) :
          {state: {online: false}},
      ]);
      const events = page.items.slice().reverse();  // oldest first
      const segments = [];
      let online = before && before.state ? Boolean(before.state.online) : null;
      let start = before ? Math.max(from, registered) : null;
      for (const e of events) {
        const at = Date.parse(e.at);
        if (start !== null && online !== null) segments.push({from: start, to: at, online});
        online = e.type === "connected"; start = at;
      }
      if (start !== null && online !== null) segments.push({from: start, to, online});
      timeline(box, segments, from, to);
      box.append(h("p", {class: "muted"}, events.length ?
        `${events.length} connection change${events.length === 1 ? "" : "s"} in this range` :
        "no connection changes in this range"));
    } catch (e) { failed(box, e); }
  }

  async function history(more = false) {
    const box = $("device-history");
    try {
      const page = await get(`/devices/${encodeURIComponent(deviceId)}/history`,
        {limit: 20, cursor: more ? historyCursor : null});
      historyCursor = page.next_cursor;
      const rows = table([
        {label: "Version", cell: e => e.version},
        {label: "Event", cell: e => h("strong", {}, e.type)},
        {label: "At", cell: e => when(e.at)},
        {label: "By", cell: e => e.caused_by ?? "–"},
        {label: "Changes", cell: e => json(e.changes)},
      ], page.items, {empty: "No events."});
      if (more && box.querySelector("tbody") && rows.querySelector) {
        box.querySelector("tbody").append(...rows.querySelectorAll("tbody tr"));
      } else box.replaceChildren(rows);
      $("history-more").hidden = !historyCursor;
    } catch (e) { failed(box, e); }
  }

  for (const b of document.querySelectorAll("#ranges button")) {
    b.onclick = () => { state.range = b.dataset.range; $("charts").replaceChildren(); charts(); };
  }
  $("history-more").onclick = () => history(true);
  $("command-form").hidden = !canWrite();
  $("command-result").textContent = ""; delete $("command-result").dataset.command;
  $("command-form").onsubmit = async event => {
    event.preventDefault();
    let args = {};
    const raw = $("command-args").value.trim();
    if (raw) {
      try { args = JSON.parse(raw); } catch {
        $("command-result").textContent = "Arguments must be a JSON object."; return;
      }
      if (typeof args !== "object" || Array.isArray(args) || args === null) {
        $("command-result").textContent = "Arguments must be a JSON object."; return;
      }
    }
    $("command-send").disabled = true;
    try {
      const {body, position} = await post(`/devices/${encodeURIComponent(deviceId)}/commands`,
        {name: $("command-name").value.trim(), args, ttl_s: Number($("command-ttl").value) || 3600});
      $("command-result").dataset.command = body.command_id;
      $("command-result").textContent = `${body.command_id}: sent`;
      await refresh(position);
    } catch (e) {
      $("command-result").textContent = "Not sent: " + e.message;
    } finally { $("command-send").disabled = false; }
  };

  const live = debounce(() => { refresh(); history(); }, 1000);
  const liveCharts = debounce(() => { if (RANGES[state.range][0] <= 3600e3) charts(); }, 5000);
  ["charts", "timeline", "device-history", "device-commands", "device-alerts"]
    .forEach(id => $(id).replaceChildren());
  return {
    name: "device",
    async refresh() {
      loading($("device-commands"));
      await refresh();
      await Promise.all([charts(), history()]);
    },
    changed(id) { if (id === deviceId) { live(); liveCharts(); } },
  };
}

// --- alerts

function alertTable(items, reload, empty) {
  return table([
    {label: "Severity", cell: a => h("span", {class: "sev " + a.severity}, a.severity)},
    {label: "Device", cell: a => h("a", {href: "#/devices/" + encodeURIComponent(a.device_id)},
      a.device_id)},
    {label: "Rule", cell: a => a.rule_id},
    {label: "Metric", cell: a => a.metric ?? "–"},
    {label: "Value", cell: a => a.raised_value === null || a.raised_value === undefined ? "–" :
      formatNumber(a.raised_value) + (a.last_value !== null && a.last_value !== undefined ?
        ` (now ${formatNumber(a.last_value)})` : "")},
    {label: "Raised", cell: a => when(new Date(a.raised_at_ms).toISOString())},
    {label: "Status", cell: a => [badge(a.status), a.retriggers ? h("span", {class: "muted"},
      ` ×${a.retriggers + 1}`) : null]},
    {label: "", cell: a => a.status === "active" && !a.acknowledged ?
      h("button", {class: "write ack", type: "button", "data-alert": a.alert_id,
        onclick: event => acknowledge(a, event.target, reload)}, "Acknowledge") :
      (a.acknowledged_by ? h("span", {class: "muted"}, "by " + a.acknowledged_by) : "")},
  ], items, {empty, rowAttrs: a => ({"data-alert-row": a.alert_id, "data-status": a.status})});
}

async function acknowledge(alert, button, reload) {
  button.disabled = true;
  try {
    const {position} = await post(`/alerts/${encodeURIComponent(alert.alert_id)}/acknowledge`, {});
    banner(`Alert on ${alert.device_id} (${alert.rule_id}) acknowledged.`, "ok");
    await reload(position);
  } catch (e) {
    button.disabled = false;
    banner("Could not acknowledge: " + e.message);
  }
}

function alertList() {
  let cursor = null;
  const form = $("alert-filters");
  if (!form.dataset.ready) { $("alert-status").value = "active"; form.dataset.ready = "1"; }
  form.onsubmit = event => { event.preventDefault(); refresh(); };
  async function refresh(after = null, more = false) {
    const list = $("alert-list");
    if (!more && !list.firstChild) loading(list);
    try {
      const page = await get("/alerts", {status: $("alert-status").value,
        severity: $("alert-severity").value, limit: PAGE_SIZE, cursor: more ? cursor : null},
        after ? {"Iot-After": after} : {});
      cursor = page.next_cursor;
      const rows = alertTable(page.items, position => refresh(position),
        $("alert-status").value || $("alert-severity").value ? "No alerts match." :
          "No alerts yet.");
      if (more && list.querySelector("tbody") && rows.querySelector("tbody")) {
        list.querySelector("tbody").append(...rows.querySelectorAll("tbody tr"));
      } else list.replaceChildren(rows);
      $("alert-more").hidden = !cursor;
    } catch (e) { failed(list, e); }
  }
  $("alert-more").onclick = () => refresh(null, true);
  return {name: "alerts", refresh: () => refresh(), changed: debounce(() => refresh(), 2000)};
}

// ------------------------------------------------------------------ start

async function start() {
  try {
    const config = await (await fetch("/ui/config.json")).json();
    state.commandsUrl = (config.commands_url ||
      `${location.protocol}//${location.hostname}:8080${API}`).replace(/\/$/, "");
  } catch {
    state.commandsUrl = `${location.protocol}//${location.hostname}:8080${API}`;
  }
  if (state.token) {
    try { await signIn(state.token); } catch (e) {
      signOut(e.status === 401 ? "Your token is no longer accepted: sign in again." :
        "Could not reach the gateway: " + e.message);
      return;
    }
  }
  route();
}

start();
