// StoreLink status page: renders the gateway's status, pushed as server-sent events. No build step, no
// framework; every value goes in through textContent, never innerHTML. $, el and duration: dom.js.
"use strict";

let last = null;

function ago(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  const when = new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (s < 60) return `just now (${when})`;
  if (s < 3600) return `${Math.round(s / 60)} min ago (${when})`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago (${when})`;
  return new Date(iso).toLocaleString();
}

function setText(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  if (cls !== undefined) el.className = el.className.replace(/\b(good|warning|problem)\b/g, "").trim() + " " + cls;
}

function verdict(s) {
  const problems = [];
  // last_error says what to fix in plain words (storelink.mqtt_problems): a certificate, the address, a refusal.
  if (!s.uplink.connected) problems.push(["bad", `Head office unreachable ${s.uplink.offline_since ? "since " + ago(s.uplink.offline_since) : ""}${s.uplink.last_error ? ": " + s.uplink.last_error : ""}. Sales and events are kept safely and sent later.`]);
  const refused = s.uplink.refused_subscriptions || [];
  if (s.uplink.connected && refused.length) problems.push(["bad", `The broker does not let this store read ${refused.join(", ")}: price changes and commands from head office cannot arrive.`]);
  const alarms = Object.values(s.outbox.alarms || {});
  if (alarms.length) problems.push(["bad", `Storage alarm: ${alarms.join("; ")}`]);
  const failed = Object.entries(s.parts || {}).filter(([, p]) => p.state === "failed");
  if (failed.length) problems.push(["bad", `Not running: ${failed.map(([n, p]) => `${n} (${p.last_error})`).join(", ")}; retrying. Sales are not affected.`]);
  const down = (s.devices || []).filter((d) => d.state !== "ok");
  if (down.length) problems.push(["warn", `${down.length} device${down.length > 1 ? "s" : ""} not working: ${down.map((d) => d.device).join(", ")}`]);
  const stale = priceDevices(s).filter(([, d]) => d.state === "stale");
  if (stale.length) problems.push(["warn", `Prices not up to date on ${stale.map(([n]) => n).join(", ")}`]);
  const drifting = priceDevices(s).filter(([, d]) => d.drift);
  if (drifting.length) problems.push(["bad", `Shelf labels not confirmed: ${drifting.map(([n, d]) => `${n} (${d.drift})`).join("; ")}. Tills keep the lower price for those items until the labels show it.`]);
  const away = priceDevices(s).filter(([, d]) => d.state === "undelivered");
  if (away.length) problems.push(["warn", `Label system${away.length > 1 ? "s" : ""} ${away.map(([n]) => n).join(", ")} not reachable: a price change waits for ${away.length > 1 ? "them" : "it"}.`]);
  const clock = (s.prices || {}).clock;
  const lastReason = ((s.prices || {}).last || {}).reason || "";
  if (clock && clock.synchronised === false && lastReason.startsWith("clock_not_synchronised")) problems.push(["warn", "The clock is not synchronised: a scheduled price change was refused."]);
  const cfg = (s.config || {}).last_result;
  if (cfg && (cfg.status === "rejected" || cfg.status === "rolled_back")) problems.push(["warn", `Last configuration change was ${cfg.status.replace("_", " ")}`]);
  if (!problems.length) return ["ok", "All good: connected to head office, everything working."];
  const worst = problems.some(([l]) => l === "bad") ? "bad" : "warn";
  return [worst, problems.map(([, t]) => t).join(" · ")];
}

function priceDevices(s) {
  const p = s.prices;
  return p && p.devices && typeof p.devices === "object" ? Object.entries(p.devices) : [];
}

function money(minor, currency) {
  if (minor == null) return "–";
  try {
    if (currency) return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(minor / 100);
  } catch (err) { /* an unknown currency code: plain digits below */ }
  return (minor / 100).toFixed(2);
}

// A price change whose labels are still confirming: what changes, how many labels are left, and what the tills
// charge meanwhile (the lower of the old and new price, so nobody pays more than the shelf says).
function renderTransition(t, currency) {
  const box = el("div", null, "transition");
  box.dataset.batch = t.batch_id;
  const backing = t.outcome === "aborted";
  box.append(el("p", backing
    ? `Price change to version ${t.version ?? "?"} called off: old labels going back on ${t.skus} item${t.skus === 1 ? "" : "s"}`
    : `Price change to version ${t.version ?? "?"} reaching the shelf: ${t.skus} item${t.skus === 1 ? "" : "s"}`,
  "transition-title"));
  box.append(el("p", "Until every label shows it, tills charge the lower of the old and the new price.", "transition-rule"));
  const devices = Object.entries(t.labels || {});
  if (devices.length) {
    const left = t.labels_left;
    const summary = el("p", left == null ? "Labels: waiting for confirmation" : left === 0 ? "Labels: all confirmed"
      : `Labels left: ${left}`, "labels-left");
    box.append(summary);
    const ul = el("ul", null, "label-devices");
    for (const [name, d] of devices) {
      const text = d.total != null ? `${name}: ${d.total - d.left} of ${d.total} done` : `${name}: ${d.confirmed ? "confirmed" : "waiting"}`;
      const li = el("li", text, d.confirmed ? "good" : "");
      li.dataset.device = name;
      ul.append(li);
    }
    box.append(ul);
  }
  const items = el("ul", null, "changes");
  for (const it of t.items || []) {
    const li = el("li");
    li.dataset.sku = it.sku;
    li.append(el("span", it.description || it.sku, "item-name"));
    const was = it.old_price == null ? "new item" : money(it.old_price, currency);
    const now = it.new_price == null ? "removed" : money(it.new_price, currency);
    li.append(el("span", `${was} → ${now}`, "item-prices"));
    li.append(el("span", `tills charge ${money(it.charged, currency)}`, "item-charged"));
    items.append(li);
  }
  box.append(items);
  const more = t.skus - (t.items || []).length;
  if (more > 0) box.append(el("p", `and ${more} more`, "muted"));
  return box;
}

function renderPrices(s) {
  const box = $("prices");
  box.replaceChildren();
  const p = s.prices;
  if (!p || typeof p !== "object") { box.append(el("p", "No price information.", "muted")); return; }
  if (p.error) { box.append(el("p", `Price status unavailable: ${p.error}`, "problem")); return; }
  if ("active_version" in p) {
    box.append(el("p", p.active_version ? `Version ${p.active_version}` : "No price list yet", "big"));
    for (const t of p.transition || []) box.append(renderTransition(t, p.currency));
    const dl = el("dl");
    const add = (k, v) => { dl.append(el("dt", k), el("dd", v)); };
    add("Active since", ago(p.active_since));
    if (p.items !== undefined) add("Items", p.items);
    add("Update in progress", p.pending ? `version ${p.pending.version}: ${p.pending.phase}` : "none");
    const scheduled = p.scheduled || [];
    add("Scheduled", scheduled.length ? scheduled.map((x) => `version ${x.version} at ${new Date(x.effective_at).toLocaleString()}`).join("; ") : "none");
    if (p.clock && p.clock.synchronised === false) add("Clock", "not synchronised: scheduled changes are refused");
    const labels = priceDevices(s).filter(([, d]) => d.role === "label" && d.state !== "current");
    if (labels.length) add("Labels", labels.map(([n, d]) => `${n}: ${d.state.replace("_", " ")}`).join(", "));
    if (p.last) add("Last update", `version ${p.last.version}: ${p.last.outcome}${p.last.reason ? " (" + p.last.reason + ")" : ""}`);
    const devs = priceDevices(s);
    const stale = devs.filter(([, d]) => d.state === "stale").map(([n]) => n);
    add("Devices behind", stale.length ? stale.join(", ") : "none");
    box.append(dl);
    return;
  }
  // A price part that reports something else: show its top-level facts as they are.
  const dl = el("dl");
  for (const [k, v] of Object.entries(p)) {
    if (v === null || typeof v === "object") continue;
    dl.append(el("dt", k), el("dd", v));
  }
  box.append(dl);
}

function renderDevices(s) {
  const body = $("devices");
  body.replaceChildren();
  const devices = s.devices || [];
  $("no-devices").hidden = devices.length > 0;
  for (const d of devices) {
    const tr = el("tr");
    tr.dataset.device = d.device;
    const name = el("td", d.device);
    name.append(el("div", d.driver, "muted"));
    const state = el("td");
    state.append(el("span", d.state, `pill ${d.state}`));
    const btn = el("button", "Restart");
    btn.type = "button";
    btn.dataset.action = "restart-device";
    btn.dataset.args = JSON.stringify({ device: d.device });
    const act = el("td");
    act.append(btn);
    tr.append(name, state, el("td", ago(d.last_seen)), el("td", d.last_error || "–", d.last_error ? "" : "none"), act);
    body.append(tr);
  }
}

function renderEvents(s) {
  const list = $("events");
  list.replaceChildren();
  const events = s.recent_events || [];
  $("no-events").hidden = events.length > 0;
  for (const e of events) {
    const li = el("li");
    const t = el("time", new Date(e.ts).toLocaleTimeString());
    t.dateTime = e.ts;
    li.append(t, el("span", e.kind), el("span", e.device, "muted"));
    list.append(li);
  }
}

function render(s) {
  last = s;
  $("store").textContent = s.store_id;
  $("version").textContent = `StoreLink ${s.version}`;
  $("updated").textContent = new Date().toLocaleTimeString();
  const [level, text] = verdict(s);
  const v = $("verdict");
  v.className = `verdict ${level}`;
  v.textContent = text;
  const up = s.uplink;
  setText("uplink-state", up.connected ? "Connected" : "Offline", up.connected ? "good" : "problem");
  setText("uplink-broker", up.broker);
  setText("uplink-since-label", up.connected ? "Connected since" : "Offline since");
  setText("uplink-since", ago(up.connected ? up.connected_since : up.offline_since));
  setText("uplink-error", up.last_error || "–");
  const ob = s.outbox;
  setText("outbox-depth", ob.depth === 0 ? "Nothing waiting" : `${ob.depth} waiting`, ob.depth === 0 ? "good" : (up.connected ? "warning" : "problem"));
  setText("outbox-oldest", ob.oldest_undelivered_age_s == null ? "–" : duration(ob.oldest_undelivered_age_s));
  setText("outbox-delivered", ob.delivered_total);
  const alarms = Object.entries(ob.alarms || {});
  setText("outbox-alarms", alarms.length ? alarms.map(([k, m]) => `${k}: ${m}`).join("; ") : "none", alarms.length ? "problem" : "");
  const cfg = s.config || {};
  setText("config-version", cfg.version ?? "–");
  const r = cfg.last_result;
  setText("config-result", cfg.trial ? `trying version ${cfg.trial.version} (rolls back by ${new Date(cfg.trial.deadline).toLocaleTimeString()})`
    : r ? `version ${r.version ?? "?"} ${r.status.replace("_", " ")} ${ago(r.ts)}${Object.keys(r.errors || {}).length ? ": " + Object.entries(r.errors).map(([k, m]) => `${k}: ${m}`).join("; ") : ""}` : "no remote change yet");
  renderPrices(s);
  renderDevices(s);
  renderEvents(s);
  document.querySelectorAll("button[data-action]").forEach((b) => {
    b.disabled = !s.actions_enabled || !(b.dataset.action in (s.actions || {}));
    b.title = s.actions_enabled ? "" : "actions are disabled on this gateway (no token configured)";
  });
  document.body.dataset.connected = String(up.connected);
}

async function runAction(button) {
  const out = $("action-result");
  const token = $("token").value.trim() || sessionStorage.getItem("storelink-token") || "";
  if (token) sessionStorage.setItem("storelink-token", token);
  out.className = "";
  out.textContent = `${button.textContent}…`;
  try {
    const resp = await fetch(`/api/v1/actions/${encodeURIComponent(button.dataset.action)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
      body: JSON.stringify({ args: JSON.parse(button.dataset.args || "{}") }),
    });
    const body = await resp.json().catch(() => ({}));
    if (resp.ok) {
      out.className = "done";
      out.textContent = `Done: ${button.textContent}.`;
    } else {
      out.className = "error";
      const why = resp.status === 401 ? "the access token is missing or wrong" : body.error || resp.statusText;
      out.textContent = `Not done: ${why}.`;
      if (resp.status === 401) sessionStorage.removeItem("storelink-token");
    }
  } catch (err) {
    out.className = "error";
    out.textContent = `Not done: cannot reach the gateway (${err}).`;
  }
}

document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-action]");
  if (b && !b.disabled) runAction(b);
});
$("token-form").addEventListener("submit", (ev) => ev.preventDefault());

function connect() {
  const source = new EventSource("/api/v1/stream");
  source.addEventListener("status", (ev) => render(JSON.parse(ev.data)));
  source.onerror = () => {
    const v = $("verdict");
    v.className = "verdict unknown";
    v.textContent = "Lost contact with the gateway itself; retrying…";
  };
}

setInterval(() => { if (last) { render(last); } }, 15000); // keep "x min ago" fresh between updates
connect();
