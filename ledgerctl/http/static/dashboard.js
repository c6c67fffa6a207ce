// The ledger dashboard: plain DOM, no build step. Live by server-sent events (/api/events), each one a
// (debounced) re-fetch of the JSON API; an as-of control asks the same API for a past moment (?as_of=).
"use strict";

const $ = (sel) => document.querySelector(sel);
const view = { asOf: null, latestSeq: 0, events: [], entity: null };
const seen = new Map();  // table id -> {row id -> row text}, to flash what changed

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function hms(iso) { return iso ? new Date(iso).toISOString().slice(11, 19) : "-"; }
function when(iso) { return iso ? new Date(iso).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "-"; }
function pill(text) { return `<span class="pill h-${esc(text)}">${esc(text)}</span>`; }
function link(kind, id) { return id ? `<a href="#/${kind}/${encodeURIComponent(id)}">${esc(id)}</a>` : "-"; }
function counts(map) { return Object.entries(map || {}).map(([k, n]) => `${pill(k)} ${n}`).join(" ") || "-"; }

async function api(path, params = {}) {
  const query = new URLSearchParams(params);
  if (view.asOf !== null) query.set("as_of", view.asOf);
  const reply = await fetch(`${path}${query.size ? "?" + query : ""}`);
  const body = await reply.json();
  if (!reply.ok) throw new Error(`${path}: ${body.message || body.detail || reply.status}`);
  return body;
}

function fill(id, rows, columns, key) {
  const body = $(`#${id} tbody`);
  const before = seen.get(id) || new Map();
  const after = new Map();
  if (!rows.length) {
    body.innerHTML = `<tr><td class="empty" colspan="${$(`#${id} thead tr`).children.length}">none</td></tr>`;
  } else {
    body.innerHTML = rows.map((row) => {
      const cells = columns.map(([cls, render]) => `<td class="${cls}">${render(row)}</td>`).join("");
      const rowKey = key(row);
      // A row flashes when what it says changed; ages (the "beat" column) change at every refresh.
      const said = columns.filter(([cls]) => cls !== "beat").map(([, render]) => render(row)).join("|");
      after.set(rowKey, said);
      const flash = before.size && before.get(rowKey) !== said ? ' class="changed"' : "";
      return `<tr data-id="${esc(rowKey)}"${flash}>${cells}</tr>`;
    }).join("");
  }
  seen.set(id, after);
}

function showPosition(position) {
  const at = position.ledger_time ? ` at ${when(position.ledger_time)}` : "";
  $("#position").textContent = `LEDGER #${position.ledger_seq}${at} · ${position.source}`;
  if (view.asOf === null) {
    view.latestSeq = position.ledger_seq;
    const slider = $("#asof-seq");
    slider.max = String(position.ledger_seq);
    slider.value = String(position.ledger_seq);
    $("#asof-seq-label").textContent = "now";
  }
}

async function refreshOverview() {
  const [agents, sessions, routes, pools, anomalies] = await Promise.all([
    api("/api/agents"), api("/api/sessions"), api("/api/routes"), api("/api/pools"), api("/api/anomalies", { limit: 20 }),
  ]);
  showPosition(sessions.position);
  fill("pools", pools.items, [
    ["pool", (p) => esc(p.pool)], ["agents", (p) => counts(p.agents)], ["sessions", (p) => counts(p.sessions)],
    ["capacity", (p) => `${p.free_capacity} / ${p.capacity}`],
    ["breaker", (p) => p.breaker_open ? `${pill("open")} ${esc(p.breaker_reason)}` : pill("closed")],
  ], (p) => p.pool);
  fill("agents", agents.items, [
    ["agent", (a) => link("agent", a.agent_id)], ["pool", (a) => esc(a.pool)], ["health", (a) => pill(a.health)],
    ["rule", (a) => esc(a.rule)], ["sessions", (a) => a.sessions],
    ["beat", (a) => a.last_heartbeat_seq ? `#${a.last_heartbeat_seq} ${a.heartbeat_age?.toFixed(1)} s ago` : "-"],
  ], (a) => a.agent_id);
  fill("sessions", sessions.items, [
    ["session", (s) => link("session", s.session_id)], ["pool", (s) => esc(s.pool)], ["state", (s) => pill(s.state)],
    ["owner", (s) => s.owner ? `${link("agent", s.owner)} ${s.owner_health ? pill(s.owner_health) : ""}` : "-"],
    ["token", (s) => s.token ?? "-"], ["claim", (s) => esc(s.claim_reason || s.reason || "")],
  ], (s) => s.session_id);
  fill("routes", routes.items, [
    ["route", (r) => link("route", r.route_id)], ["session", (r) => link("session", r.session_id)],
    ["status", (r) => pill(r.status) + (r.sub_status ? ` ${esc(r.sub_status)}` : "")],
    ["health", (r) => pill(r.health) + (r.health_stale ? " stale" : "")], ["traffic", (r) => esc(r.traffic)],
  ], (r) => r.route_id);
  fill("anomalies", anomalies.items, [
    ["seq", (a) => a.seq], ["entity", (a) => link(a.entity_kind, a.entity_id)], ["event", (a) => esc(a.event_type)],
    ["kind", (a) => pill(a.kind)], ["detail", (a) => esc(a.detail)],
  ], (a) => `${a.stream}:${a.seq}`);
  showEvents();
}

// Routine reports that change nothing an operator watches for: a route's healthy probe every second would push
// every real event (a claim, a death) out of the panel. The route table shows the health.
const ROUTINE = new Set(["route.health_reported", "agent.heartbeat"]);

function showEvents() {
  const news = view.events.filter((e) => !ROUTINE.has(e.type) || e.anomaly);
  const shown = view.asOf === null ? news : news.filter((e) => e.stream !== "LEDGER" || e.seq <= view.latestShown);
  fill("events", shown.slice(0, 25), [
    ["seq", (e) => e.seq], ["stored", (e) => hms(e.stored_at)], ["event", (e) => esc(e.type)],
    ["entity", (e) => e.entity ? link(...e.entity.split("/")) : esc(e.anomaly)],
  ], (e) => `${e.stream}:${e.seq}`);
}

// --- the entity page: its history, each change told as a sentence, with the chain of its causes ---------

const histories = new Map();
async function historyOf(kind, id) {
  const key = `${kind}/${id}`;
  if (!histories.has(key)) histories.set(key, api(`/api/history/${kind}/${encodeURIComponent(id)}`).catch(() => null));
  return histories.get(key);
}

function sentence(entry, kind, id) {
  const e = entry.event || {};
  const at = `at ${hms(entry.stored_at)}`;
  const ev = e.evidence || {};
  const beat = ev.last_heartbeat_seq ? `: last beat #${ev.last_heartbeat_seq} at ${hms(ev.last_heartbeat_at)}` : "";
  const ttl = ev.dead_after ? `, ttl ${ev.dead_after} s` : "";
  if (entry.type === "dead_letter") return `a message that is not an event was stored ${at} (${entry.dead_letter})`;
  let text;
  switch (entry.type) {
    case "session.created": text = `${e.session_id} was created in pool ${e.pool} ${at}`; break;
    case "session.claimed": {
      const from = e.previous_owner || (entry.changes.owner || [])[0];
      text = from && from !== e.agent_id
        ? `${e.session_id} moved from ${from} to ${e.agent_id} ${at} (${e.reason}, token #${entry.seq})`
        : `${e.session_id} was claimed by ${e.agent_id} ${at} (${e.reason}, token #${entry.seq})`;
      break;
    }
    case "session.orphaned": text = `${e.session_id} was orphaned ${at}: ${e.reason}${e.previous_owner ? `, owner was ${e.previous_owner}` : ""}`; break;
    case "session.released": text = `${e.agent_id} released ${e.session_id} ${at}${e.reason ? ` (${e.reason})` : ""}`; break;
    case "session.terminated": text = `${e.session_id} was terminated ${at}${e.reason ? ` (${e.reason})` : ""}`; break;
    case "agent.registered": text = `${e.agent_id} registered in pool ${e.pool} ${at} (incarnation #${entry.seq}, heartbeat every ${e.heartbeat_interval} s, ttl ${e.ttl} s)`; break;
    case "agent.goodbye": text = `${e.agent_id} said goodbye ${at} (${e.reason})`; break;
    case "agent.declared_dead": text = `the monitor declared ${e.agent_id} dead ${at}${beat}${ttl}`; break;
    case "agent.suspected": text = `the monitor suspected ${e.agent_id} ${at} (${e.reason})${beat}`; break;
    case "agent.fenced": text = `${e.agent_id} fenced itself ${at} (${e.reason})`; break;
    case "agent.draining": text = `${e.agent_id} started draining ${at}${e.reason ? ` (${e.reason})` : ""}`; break;
    case "route.transitioned": text = `route ${e.route_id} moved to ${e.to_state || e.state || ""} ${at}${e.reason ? ` (${e.reason})` : ""}`; break;
    default: text = `${entry.type} by ${entry.producer || "?"} ${at}`;
  }
  if (entry.anomaly) text += ` - flagged ${entry.anomaly.kind}, not applied: ${entry.anomaly.detail}`;
  return text;
}

async function causeOf(entry, kind, id) {
  if (!entry.causation_id) return null;
  const e = entry.event || {};
  const candidates = [[kind, id], ["agent", e.previous_owner], ["agent", e.agent_id], ["session", e.session_id],
                      ["pool", e.pool]].filter(([, v]) => v);
  for (const [k, v] of candidates) {
    const h = await historyOf(k, v);
    const found = h && h.entries.find((x) => x.event_id === entry.causation_id);
    if (found) return { entry: found, kind: k, id: v };
  }
  return null;
}

async function chainOf(entry, kind, id) {
  const chain = [];
  let at = { entry, kind, id };
  for (let depth = 0; depth < 5; depth++) {
    at = await causeOf(at.entry, at.kind, at.id);
    if (!at) break;
    chain.push(`because ${sentence(at.entry, at.kind, at.id)}`);
  }
  return chain;
}

// The chain of causes behind the entity's state, as `ledger why` tells it (GET /api/why), above its history.
async function showWhy(kind, id) {
  const el = $("#entity-why");
  if (kind === "pool") { el.innerHTML = ""; return; }
  const params = new URLSearchParams();
  if (view.asOf !== null) params.set(/^\d+$/.test(String(view.asOf)) ? "at_seq" : "at", view.asOf);
  try {
    const reply = await fetch(`/api/why/${kind}/${encodeURIComponent(id)}${params.size ? "?" + params : ""}`);
    const chain = await reply.json();
    if (!reply.ok) throw new Error(chain.message || reply.status);
    el.innerHTML = `<li class="why-summary">Why: ${esc(chain.summary)}</li>` + chain.links.map((l, i) =>
      `<li data-seq="${l.seq}" data-stream="${esc(l.stream)}"${l.flag ? ' class="flag"' : ""}>${i ? "because " : ""}` +
      `${esc(l.stream)} #${l.seq} at ${hms(l.time)}: ${esc(l.sentence)}</li>`).join("") +
      `<li class="muted">(${esc(chain.end)})</li>`;
  } catch (err) {
    el.innerHTML = `<li class="muted">why: ${esc(String(err.message || err))}</li>`;
  }
}

async function refreshEntity() {
  const { kind, id } = view.entity;
  histories.clear();
  $("#entity-title").innerHTML = `${esc(kind)} ${esc(id)} <a class="muted" href="#/">back</a>`;
  let history;
  try {
    history = await api(`/api/history/${kind}/${encodeURIComponent(id)}`);
    histories.set(`${kind}/${id}`, Promise.resolve(history));
    if (!history) throw new Error(`no history for ${kind} ${id}`);
  } catch (err) {
    $("#entity-state").textContent = String(err.message || err);
    $("#entity-story").innerHTML = "";
    return;
  }
  const last = history.entries[history.entries.length - 1];
  $("#position").textContent = `${history.entries.length} events of ${kind} ${id}, the last LEDGER #${last.seq} at ${when(last.stored_at)}` +
    (view.asOf === null ? "" : ` (as of ${view.asOf})`);
  const state = history.state || {};
  const summary = kind === "session" ? `${state.status || "?"}, owner ${state.owner || "-"}, token ${state.token ?? "-"}`
    : kind === "agent" ? `${state.status || "?"} in pool ${state.pool || "?"}, incarnation ${state.incarnation ?? "?"}`
    : Object.entries(state).slice(0, 4).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ");
  $("#entity-state").textContent = `Now: ${summary}. ${history.notes.join(" ")}`;
  await showWhy(kind, id);
  const items = [];
  for (const entry of history.entries) {
    const chain = await chainOf(entry, kind, id);
    const cls = entry.anomaly ? ' class="flag"' : "";
    items.push(`<li data-seq="${entry.seq}"${cls}>${esc(sentence(entry, kind, id))}` +
      (chain.length ? `<ol class="chain">${chain.map((c) => `<li>${esc(c)}</li>`).join("")}</ol>` : "") + "</li>");
  }
  $("#entity-story").innerHTML = items.join("");
  fill("entity-entries", history.entries, [
    ["seq", (x) => x.seq], ["stored", (x) => when(x.stored_at)], ["event", (x) => esc(x.type)],
    ["by", (x) => esc(x.producer || "-")],
    ["effect", (x) => x.anomaly ? pill(x.anomaly.kind) : esc(Object.entries(x.changes).map(([k, [a, b]]) => `${k}: ${JSON.stringify(a)} → ${JSON.stringify(b)}`).join("; "))],
  ], (x) => String(x.seq));
}

// --- routing, live updates, the as-of control ---------------------------------------------------------

function route() {
  const hash = location.hash.match(/^#\/(agent|session|route|pool)\/(.+)$/);
  const path = location.pathname.match(/^\/entity\/(agent|session|route|pool)\/(.+)$/);
  const m = hash || path;
  view.entity = m ? { kind: m[1], id: decodeURIComponent(m[2]) } : null;
  $("#overview").hidden = !!view.entity;
  $("#entity").hidden = !view.entity;
  return refresh();
}

let running = null, again = false;
async function refresh() {
  if (running) { again = true; return running; }
  running = (async () => {
    try {
      await (view.entity ? refreshEntity() : refreshOverview());
      document.body.dataset.refreshed = String(Date.now());
    } catch (err) {
      $("#position").textContent = String(err.message || err);
    }
  })();
  await running;
  running = null;
  if (again) { again = false; return refresh(); }
}

let timer = null;
function soon() {  // debounced: a burst of events is one re-fetch
  clearTimeout(timer);
  timer = setTimeout(refresh, 150);
}

function setAsOf(value, label) {
  view.asOf = value;
  view.latestShown = typeof value === "string" && /^\d+$/.test(value) ? Number(value) : Infinity;
  const banner = $("#asof-banner");
  banner.hidden = value === null;
  banner.textContent = value === null ? "" : `showing the ledger as of ${label} (live updates paused)`;
  if (value === null) $("#asof-time").value = "";
  refresh();
}

$("#asof-seq").addEventListener("input", (e) => { $("#asof-seq-label").textContent = `#${e.target.value}`; });
$("#asof-seq").addEventListener("change", (e) => {
  const seq = Number(e.target.value);
  if (seq >= view.latestSeq && view.asOf === null) return;
  setAsOf(String(seq), `LEDGER #${seq}`);
});
$("#asof-time").addEventListener("change", (e) => { if (e.target.value) setAsOf(e.target.value, `${e.target.value} UTC`); });
$("#asof-now").addEventListener("click", () => setAsOf(null, ""));
window.addEventListener("hashchange", route);

function listen() {
  const source = new EventSource("/api/events");
  const live = $("#live");
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "pill live"; });
  source.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "pill down"; });
  source.addEventListener("stored", (message) => {
    const event = JSON.parse(message.data);
    view.events.unshift(event);
    view.events.length = Math.min(view.events.length, 200);
    if (view.asOf === null) soon();
  });
}

(async () => {
  try {
    const recent = await (await fetch("/api/events/recent")).json();
    view.events = recent.reverse();
  } catch (err) { /* a page without history still goes live */ }
  listen();
  await route();
})();
