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
</style>
</head>
<body>
<h1>IoT fleet</h1>
<p><label>Token <input id="token" type="password" size="40"></label>
 <button id="save">Use</button> <span id="err"></span></p>
<p id="fleet"></p>
<table><thead><tr><th>device</th><th>name</th><th>type</th><th>status</th><th>online</th>
<th>last seen</th></tr></thead><tbody id="devices"></tbody></table>
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
      body.appendChild(tr);
    }
    document.getElementById("err").textContent = "";
  } catch (e) { document.getElementById("err").textContent = String(e); }
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
