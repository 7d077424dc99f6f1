// CityFuse operator dashboard. Plain JS, no dependencies, served locally.
// Rule: text that comes from messages is only ever set with textContent / attributes,
// never with innerHTML, so a report holding <script> is shown as text.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const state = { token: "", labels: [], colours: {}, ttl: 3600, rows: new Map(), view: "list",
  incident: null, source: null };

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function $(id) { return document.getElementById(id); }
function fmtTime(ts) {
  const d = new Date(ts);
  return isNaN(d) ? String(ts) : d.toISOString().replace("T", " ").slice(0, 19) + "Z";
}
function colour(label) { return state.colours[label] || "#555"; }

async function api(path, opts) {
  const o = Object.assign({ headers: {} }, opts || {});
  o.headers["X-Token"] = state.token;
  const r = await fetch(path, o);
  if (r.status === 401) { showLogin("the token was refused"); throw new Error("unauthorised"); }
  return r;
}
function mediaUrl(eventId) {
  return "/api/media/" + encodeURIComponent(eventId) + "?token=" + encodeURIComponent(state.token);
}

// ---- token ------------------------------------------------------------------------------
function readToken() {
  const m = location.hash.match(/^#token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("cityfuse-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#list");  // token out of the address bar
  }
  return sessionStorage.getItem("cityfuse-token") || "";
}
function showLogin(msg) {
  for (const s of document.querySelectorAll("section")) s.hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = msg || "";
}

// ---- list -------------------------------------------------------------------------------
function passes(row) {
  const label = $("f-label").value;
  if (label && row.label !== label) return false;
  if (!label && row.label === "no_incident" && !$("f-noinc").checked) return false;
  if (row.confidence < parseFloat($("f-conf").value)) return false;
  const mod = $("f-mod").value;
  if (mod && !(row.modalities || []).includes(mod)) return false;
  const since = parseInt($("f-time").value, 10);
  if (since > 0 && Date.now() - new Date(row.emitted_ts).getTime() > since * 1000) return false;
  return true;
}
function rowElement(row) {
  const tr = el("tr", { "data-alert-id": row.alert_id, "data-version": row.version });
  tr.appendChild(el("td", {}, fmtTime(row.emitted_ts)));
  const lab = el("td", { class: "label" });
  lab.appendChild(el("span", { class: "dot" })).style.background = colour(row.label);
  lab.appendChild(document.createTextNode(row.label));
  tr.appendChild(lab);
  tr.appendChild(el("td", { class: "num" }, row.confidence.toFixed(2)));
  tr.appendChild(el("td", {}, (row.modalities || []).join(", ")));
  tr.appendChild(el("td", {}, row.area || ""));
  tr.appendChild(el("td", { class: "num version" }, "v" + row.version));
  tr.appendChild(el("td", { class: "num" }, row.n_evidence));
  tr.appendChild(el("td", { class: "verdict" }, row.verdict ? row.verdict + (row.verdict === "relabel" ? " → " + row.verdict_label : "") : ""));
  const a = el("td");
  a.appendChild(el("a", { href: "#incident/" + encodeURIComponent(row.alert_id) }, row.alert_id));
  tr.appendChild(a);
  tr.addEventListener("click", (ev) => {
    if (ev.target.tagName !== "A") location.hash = "#incident/" + encodeURIComponent(row.alert_id);
  });
  return tr;
}
function renderList() {
  const tbody = document.querySelector("#alerts tbody");
  clear(tbody);
  const rows = [...state.rows.values()].sort((a, b) => new Date(b.emitted_ts) - new Date(a.emitted_ts));
  let shown = 0;
  for (const row of rows) {
    if (!passes(row)) continue;
    tbody.appendChild(rowElement(row));
    shown++;
  }
  $("alerts-empty").hidden = shown > 0;
}
function upsert(row) {
  const old = state.rows.get(row.alert_id);
  // A newer version replaces the row; an older one (late delivery) never overwrites it.
  if (old && old.version > row.version) return;
  state.rows.set(row.alert_id, row);
}
function refresh() {
  if (state.view === "list") renderList();
  else if (state.view === "map") renderMap();
}

// ---- map --------------------------------------------------------------------------------
function niceStep(x) {
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}
function openIncidents() {
  const now = Date.now();
  return [...state.rows.values()].filter((r) => r.location && r.label !== "no_incident" &&
    r.verdict !== "reject" && now - new Date(r.emitted_ts).getTime() <= state.ttl * 1000);
}
function renderMap() {
  const map = $("map");
  clear(map);
  const W = 900, H = 560, pad = 50;
  const pts = openIncidents();
  map.appendChild(svg("rect", { x: 0, y: 0, width: W, height: H, class: "map-bg" }));
  if (!pts.length) {
    map.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "map-note" }, "no open incidents"));
    renderLegend();
    return;
  }
  let lat0 = Infinity, lat1 = -Infinity, lon0 = Infinity, lon1 = -Infinity;
  for (const p of pts) {
    lat0 = Math.min(lat0, p.location.lat); lat1 = Math.max(lat1, p.location.lat);
    lon0 = Math.min(lon0, p.location.lon); lon1 = Math.max(lon1, p.location.lon);
  }
  // At least ~1 km of view, then equirectangular projection scaled by cos(latitude).
  const midLat = (lat0 + lat1) / 2, k = Math.cos(midLat * Math.PI / 180);
  const minSpan = 0.01;
  if (lat1 - lat0 < minSpan) { const c = (lat0 + lat1) / 2; lat0 = c - minSpan / 2; lat1 = c + minSpan / 2; }
  if ((lon1 - lon0) * k < minSpan) { const c = (lon0 + lon1) / 2; lon0 = c - minSpan / 2 / k; lon1 = c + minSpan / 2 / k; }
  const sx = (W - 2 * pad) / ((lon1 - lon0) * k), sy = (H - 2 * pad) / (lat1 - lat0);
  const s = Math.min(sx, sy);  // pixels per degree of latitude
  const cx = (lon0 + lon1) / 2, cy = (lat0 + lat1) / 2;
  const X = (lon) => W / 2 + (lon - cx) * k * s;
  const Y = (lat) => H / 2 - (lat - cy) * s;
  const lonAt = (x) => cx + (x - W / 2) / (k * s), latAt = (y) => cy - (y - H / 2) / s;
  // Grid in round fractions of a degree, labelled.
  const step = niceStep((latAt(0) - latAt(H)) / 6);
  const g = svg("g", { class: "grid" });
  for (let lon = Math.ceil(lonAt(0) / step) * step; lon <= lonAt(W); lon += step) {
    g.appendChild(svg("line", { x1: X(lon), y1: 0, x2: X(lon), y2: H }));
    g.appendChild(svg("text", { x: X(lon) + 3, y: H - 4 }, lon.toFixed(3) + "°"));
  }
  for (let lat = Math.ceil(latAt(H) / step) * step; lat <= latAt(0); lat += step) {
    g.appendChild(svg("line", { x1: 0, y1: Y(lat), x2: W, y2: Y(lat) }));
    g.appendChild(svg("text", { x: 3, y: Y(lat) - 3 }, lat.toFixed(3) + "°"));
  }
  map.appendChild(g);
  // Scale bar: 1° of latitude is ~111.32 km.
  const mPerPx = 111320 / s, barM = niceStep(mPerPx * 150), barPx = barM / mPerPx;
  const sb = svg("g", { class: "scalebar", transform: `translate(${W - barPx - 30},${H - 30})` });
  sb.appendChild(svg("rect", { x: 0, y: 0, width: barPx, height: 6 }));
  sb.appendChild(svg("text", { x: barPx / 2, y: -4, "text-anchor": "middle" },
    barM >= 1000 ? barM / 1000 + " km" : barM + " m"));
  map.appendChild(sb);
  map.appendChild(svg("text", { x: W - 20, y: 24, "text-anchor": "middle", class: "north" }, "N ↑"));
  for (const p of pts) {
    const a = svg("a", { href: "#incident/" + encodeURIComponent(p.alert_id), class: "marker",
      "data-alert-id": p.alert_id });
    const r = 7 + 8 * p.confidence;
    a.appendChild(svg("circle", { cx: X(p.location.lon), cy: Y(p.location.lat), r: r,
      fill: colour(p.label) }));
    a.appendChild(svg("title", {}, `${p.label} (${p.confidence.toFixed(2)}) ${p.area || ""} ${p.alert_id}`));
    map.appendChild(a);
  }
  renderLegend();
}
function renderLegend() {
  const lg = $("legend");
  clear(lg);
  for (const l of state.labels) {
    if (l.name === "no_incident") continue;
    const item = el("span", { class: "legend-item" });
    item.appendChild(el("span", { class: "dot" })).style.background = l.colour;
    item.appendChild(document.createTextNode(l.name));
    lg.appendChild(item);
  }
}

// ---- incident page ----------------------------------------------------------------------
function bars(container, values, colourOf) {
  clear(container);
  const entries = Object.entries(values).sort((a, b) => b[1] - a[1]);
  const max = Math.max(1e-9, ...entries.map(([, v]) => Math.abs(v)));
  for (const [name, v] of entries) {
    const row = el("div", { class: "bar-row", "data-name": name });
    row.appendChild(el("span", { class: "bar-name" }, name));
    const track = el("span", { class: "bar-track" });
    const fill = el("span", { class: "bar-fill" + (v < 0 ? " neg" : "") });
    fill.style.width = (100 * Math.abs(v) / max).toFixed(1) + "%";
    if (colourOf) fill.style.background = colourOf(name);
    track.appendChild(fill);
    row.appendChild(track);
    row.appendChild(el("span", { class: "bar-value" }, v.toFixed(3)));
    container.appendChild(row);
  }
}
async function loadIncident(alertId) {
  const r = await api("/api/alerts/" + encodeURIComponent(alertId));
  if (r.status === 404) { $("inc-title").textContent = "unknown alert " + alertId; return; }
  const inc = await r.json();
  state.incident = inc;
  const latest = inc.versions[inc.versions.length - 1];
  $("inc-title").textContent = `${latest.label} · ${latest.alert_id} · v${latest.version}`;
  bars($("inc-probs"), latest.probs, colour);
  bars($("inc-contrib"), latest.contributions, null);
  const vt = document.querySelector("#inc-versions tbody");
  clear(vt);
  for (const v of inc.versions) {
    const tr = el("tr");
    for (const c of [v.version, fmtTime(v.emitted_ts), v.label, v.confidence.toFixed(3),
      v.modalities.join(", "), v.evidence.length, v.model_version]) tr.appendChild(el("td", {}, c));
    vt.appendChild(tr);
  }
  const fbl = $("inc-feedback");
  clear(fbl);
  for (const f of inc.feedback) {
    fbl.appendChild(el("li", {}, `${fmtTime(f.ts)} ${f.operator}: ${f.action} v${f.version} → ${f.label}${f.note ? " (" + f.note + ")" : ""}`));
  }
  const sel = $("fb-label");
  if (!sel.value) sel.value = latest.label;
  const frames = $("inc-frames"), calls = $("inc-calls"), texts = $("inc-texts");
  clear(frames); clear(calls); clear(texts);
  for (const ev of inc.evidence) {
    if (ev.missing) {
      texts.appendChild(el("p", { class: "muted" }, `${ev.event_id}: not in the evidence cache`));
      continue;
    }
    const head = `${fmtTime(ev.ts)} · ${ev.source}${ev.name ? " · " + ev.name : ""}`;
    if (ev.modality === "image") {
      const fig = el("figure", { class: "frame", "data-event-id": ev.event_id });
      if (ev.has_media) fig.appendChild(el("img", { src: mediaUrl(ev.event_id), alt: "camera frame " + ev.event_id }));
      fig.appendChild(el("figcaption", {}, head));
      frames.appendChild(fig);
    } else if (ev.modality === "audio") {
      const box = el("div", { class: "call", "data-event-id": ev.event_id });
      box.appendChild(el("div", { class: "meta" }, head));
      if (ev.has_media) box.appendChild(el("audio", { controls: "", preload: "metadata", src: mediaUrl(ev.event_id) }));
      box.appendChild(el("p", { class: "transcript" }, ev.transcript || "(no transcript yet)"));
      calls.appendChild(box);
    } else {
      const box = el("div", { class: "report", "data-event-id": ev.event_id });
      box.appendChild(el("div", { class: "meta" }, head + (ev.lang ? " · " + ev.lang : "")));
      box.appendChild(el("p", { class: "report-text" }, ev.text || ""));
      texts.appendChild(box);
    }
  }
}
async function sendFeedback(action) {
  const inc = state.incident;
  if (!inc) return;
  const latest = inc.versions[inc.versions.length - 1];
  const label = action === "confirm" ? latest.label : action === "reject" ? "no_incident" : $("fb-label").value;
  const body = { alert_id: latest.alert_id, version: latest.version, action: action, label: label,
    operator: $("fb-operator").value.trim(), note: $("fb-note").value };
  sessionStorage.setItem("cityfuse-operator", body.operator);
  const r = await api("/api/feedback", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const out = await r.json();
  $("fb-status").textContent = r.ok ? `sent: ${action} v${latest.version} → ${label}` : `refused: ${out.error}`;
  $("fb-status").className = "status " + (r.ok ? "ok" : "error");
}

// ---- health -----------------------------------------------------------------------------
async function loadHealth() {
  const h = await (await api("/api/health")).json();
  const fill = (id, rows) => {
    const tb = document.querySelector(id + " tbody");
    clear(tb);
    for (const cells of rows) {
      const tr = el("tr");
      for (const c of cells) tr.appendChild(el("td", {}, c));
      tb.appendChild(tr);
    }
  };
  fill("#h-lag", Object.entries(h.groups).map(([g, v]) => [g, v.lag,
    Object.entries(v.by_topic).map(([t, n]) => `${t}: ${n}`).join(", ")]));
  if (h.lag_error) fill("#h-lag", [["(unavailable)", "", h.lag_error]]);
  fill("#h-dlq", Object.entries(h.dlq.by_reason).map(([r, n]) => [r, n]));
  const topics = new Set([...Object.keys(h.records), ...Object.keys(h.throughput)]);
  fill("#h-tp", [...topics].sort().map((t) => [t, (h.throughput[t] || 0).toFixed(2), h.records[t] || 0]));
  $("h-cache").textContent = `evidence cache: ${h.cache.events}/${h.cache.max_events} events, ` +
    `${(h.cache.bytes / 1e6).toFixed(1)}/${(h.cache.max_bytes / 1e6).toFixed(0)} MB, ${h.cache.evicted} evicted; ` +
    `${h.alerts} alerts, ${h.feedback} feedback records`;
}

// ---- routing and start ------------------------------------------------------------------
function route() {
  const h = location.hash || "#list";
  for (const s of document.querySelectorAll("section")) s.hidden = true;
  for (const a of document.querySelectorAll("nav a")) a.classList.remove("active");
  if (h.startsWith("#incident/")) {
    state.view = "incident";
    $("view-incident").hidden = false;
    $("fb-status").textContent = "";
    $("fb-label").value = "";
    loadIncident(decodeURIComponent(h.slice("#incident/".length)));
  } else if (h === "#map") {
    state.view = "map"; $("view-map").hidden = false; $("nav-map").classList.add("active"); renderMap();
  } else if (h === "#health") {
    state.view = "health"; $("view-health").hidden = false; $("nav-health").classList.add("active"); loadHealth();
  } else {
    state.view = "list"; $("view-list").hidden = false; $("nav-list").classList.add("active"); renderList();
  }
}
function connect() {
  if (state.source) state.source.close();
  const src = new EventSource("/api/events?token=" + encodeURIComponent(state.token));
  state.source = src;
  src.onopen = () => { $("conn").textContent = "live"; $("conn").className = "conn live"; };
  src.onerror = () => { $("conn").textContent = "reconnecting…"; $("conn").className = "conn"; };
  src.addEventListener("alert", (ev) => {
    const row = JSON.parse(ev.data);
    upsert(row);
    refresh();
    if (state.view === "incident" && state.incident && state.incident.alert_id === row.alert_id) {
      loadIncident(row.alert_id);
    }
  });
}
async function start() {
  state.token = readToken();
  if (!state.token) { showLogin(""); return; }
  let cfg;
  try { cfg = await (await api("/api/config")).json(); } catch (e) { return; }
  state.labels = cfg.labels; state.ttl = cfg.ttl_s;
  for (const l of cfg.labels) {
    state.colours[l.name] = l.colour;
    $("f-label").appendChild(el("option", { value: l.name }, l.name));
    $("fb-label").appendChild(el("option", { value: l.name }, l.name));
  }
  $("fb-operator").value = sessionStorage.getItem("cityfuse-operator") || "";
  connect();  // subscribe first: nothing emitted while the list loads is missed
  const alerts = (await (await api("/api/alerts")).json()).alerts;
  for (const row of alerts) upsert(row);
  route();
  setInterval(() => { if (state.view === "health") loadHealth(); else if (state.view === "map") renderMap(); }, 3000);
}
window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["f-label", "f-conf", "f-mod", "f-time", "f-noinc"]) {
    $(id).addEventListener("input", () => { $("f-conf-out").textContent = parseFloat($("f-conf").value).toFixed(2); renderList(); });
  }
  $("btn-confirm").addEventListener("click", () => sendFeedback("confirm"));
  $("btn-reject").addEventListener("click", () => sendFeedback("reject"));
  $("btn-relabel").addEventListener("click", () => sendFeedback("relabel"));
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("cityfuse-token", $("token-input").value.trim());
    location.hash = "#list";
    start();
  });
  start();
});
