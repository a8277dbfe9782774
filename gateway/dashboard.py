"""A minimal live dashboard page built on the gateway's own endpoints (no build step)."""

from __future__ import annotations

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>IoT fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5rem; color: #222; }
 table { border-collapse: collapse; width: 100%; }
 th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #ddd; }
 .on { color: #1a7f37; } .off { color: #999; }
 #fleet span { margin-right: 1.5rem; } #err { color: #b00; }
 #devices tr { cursor: pointer; } #devices tr.sel { background: #eef4ff; }
 #detail { margin-top: 1.5rem; } #detail pre { background: #f6f6f6; padding: .5rem; }
 .failed, .expired, .cancelled { color: #b00; } .acknowledged { color: #1a7f37; }
</style>
</head>
<body>
<h1>IoT fleet</h1>
<p><label>Token <input id="token" type="password" size="40"></label>
 <button id="save">Use</button> <span id="err"></span></p>
<p id="fleet"></p>
<table><thead><tr><th>device</th><th>name</th><th>type</th><th>status</th><th>online</th>
<th>last seen</th></tr></thead><tbody id="devices"></tbody></table>
<section id="detail" hidden>
<h2 id="d-title"></h2>
<p id="d-twin"></p>
<pre id="d-state"></pre>
<h3>Pending commands</h3>
<table><thead><tr><th>command</th><th>name</th><th>state</th><th>requested</th>
<th>expires</th></tr></thead><tbody id="d-pending"></tbody></table>
<h3>Recent outcomes</h3>
<table><thead><tr><th>command</th><th>name</th><th>state</th><th>finished</th>
<th>result / reason</th></tr></thead><tbody id="d-recent"></tbody></table>
</section>
<script>
"use strict";
const api = "/api/v1";
const tokenInput = document.getElementById("token");
tokenInput.value = localStorage.getItem("iot-token") || "";
function headers() { return {"Authorization": "Bearer " + tokenInput.value}; }
function cell(text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td;
}
async function get(path) {
  const r = await fetch(api + path, {headers: headers()});
  if (!r.ok) { throw new Error(r.status + " " + (await r.text())); }
  return r.json();
}
async function refresh() {
  try {
    const f = await get("/fleet");
    const parts = ["devices " + f.devices, "online " + f.online,
      "readings/min " + f.readings_last_minute];
    for (const [s, n] of Object.entries(f.by_status)) parts.push(s + " " + n);
    const fleet = document.getElementById("fleet"); fleet.textContent = "";
    for (const p of parts) { const s = document.createElement("span"); s.textContent = p;
      fleet.appendChild(s); }
    const page = await get("/devices?limit=100");
    const body = document.getElementById("devices"); body.textContent = "";
    for (const d of page.items) {
      const tr = document.createElement("tr");
      tr.append(cell(d.device_id), cell(d.name), cell(d.type), cell(d.status),
        cell(d.online ? "online" : "offline", d.online ? "on" : "off"), cell(d.last_seen || "-"));
      if (d.device_id === selected) tr.className = "sel";
      tr.onclick = () => { selected = d.device_id; refresh(); };
      body.appendChild(tr);
    }
    if (selected) await detail(selected);
    document.getElementById("err").textContent = "";
  } catch (e) { document.getElementById("err").textContent = String(e); }
}
let selected = null;
function rows(id, items, columns) {
  const body = document.getElementById(id); body.textContent = "";
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const c of columns) tr.append(cell(c(item) ?? "-", c === columns[2] ? item.state : ""));
    body.appendChild(tr);
  }
}
async function detail(id) {
  const d = await get("/devices/" + encodeURIComponent(id));
  document.getElementById("detail").hidden = false;
  document.getElementById("d-title").textContent = d.device_id + " (" + d.status + ", " +
    (d.online ? "online" : "offline") + ")";
  document.getElementById("d-twin").textContent = "desired v" + d.desired.version +
    ", device applied v" + (d.reported_config_version ?? "-") +
    (d.in_sync ? ", in sync" : ", not in sync");
  document.getElementById("d-state").textContent = JSON.stringify(
    {desired: d.desired.config, reported: d.reported, delta: d.delta}, null, 1);
  rows("d-pending", d.pending_commands, [c => c.command_id, c => c.name, c => c.state,
    c => c.requested_at, c => c.expires_at]);
  rows("d-recent", d.recent_commands, [c => c.command_id, c => c.name, c => c.state,
    c => c.finished_at, c => JSON.stringify(c.result ?? c.reason ?? null)]);
}
let pending = null;
function soon() { if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 1000); }
async function follow() {
  while (true) {
    try {
      const r = await fetch(api + "/stream", {headers: headers()});
      if (!r.ok || !r.body) throw new Error("stream " + r.status);
      const reader = r.body.getReader();
      while (true) {
        const {done, value} = await reader.read();
        if (done) break;
        if (new TextDecoder().decode(value).includes("event: change")) soon();
      }
    } catch (e) { /* retried below */ }
    await new Promise(ok => setTimeout(ok, 5000));
  }
}
document.getElementById("save").onclick = () => {
  localStorage.setItem("iot-token", tokenInput.value); refresh();
};
refresh(); follow(); setInterval(refresh, 30000);
</script>
</body>
</html>
"""
