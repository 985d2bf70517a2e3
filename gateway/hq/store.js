// One store's page: link, prices, outbox, alerts, devices, seq gaps, price changes and recent events.
"use strict";

const storeId = new URLSearchParams(location.search).get("id") || "";

function cellRow(values) {
  const tr = el("tr");
  for (const v of values) tr.append(v instanceof Node ? v : el("td", v));
  return tr;
}

function render(s) {
  document.title = `StoreLink head office: ${s.store_id}`;
  $("store").textContent = s.store_id;
  const link = $("link");
  link.textContent = s.online === null ? "Unknown" : (s.online ? "Online" : "Offline");
  link.className = `big ${s.online ? "good" : "problem"}`;
  if (s.state_since) link.textContent += ` since ${ago(s.state_since)}`;
  $("software").textContent = s.version || "–";
  $("groups").textContent = s.groups.length ? s.groups.join(", ") : "none";
  $("last-seen").textContent = ago(s.last_seen);
  $("prices").textContent = s.price_version == null ? "No price list" : `Version ${s.price_version}`;
  $("prices").className = `big ${s.problems.includes("behind") ? "problem" : ""}`;
  $("latest").textContent = s.latest_published == null ? "–" : `v${s.latest_published}`;
  $("pending").textContent = s.price_pending || "none";
  $("stale").textContent = (s.stale_devices || []).join(", ") || "none";
  $("outbox").textContent = s.outbox_depth == null ? "Not reported" : (s.outbox_depth ? `${s.outbox_depth} waiting` : "Nothing waiting");
  $("oldest").textContent = s.outbox_depth && s.outbox_oldest_at ? ago(s.outbox_oldest_at) : "–";
  $("evicted").textContent = s.evicted_total == null ? "–" : `${s.evicted_total} telemetry events`;
  $("reported").textContent = ago(s.outbox_reported_at);

  $("alerts").replaceChildren(...s.alerts.map((a) => alertItem(a, false)));
  $("no-alerts").hidden = s.alerts.length > 0;

  $("devices").replaceChildren(...s.devices.map((d) => {
    const st = el("td");
    st.append(el("span", d.state, `pill ${d.state}`));
    const tr = cellRow([el("td", d.device), st, el("td", d.last_seen ? new Date(d.last_seen).toLocaleString() : "–"),
                        el("td", d.last_error || "–")]);
    tr.dataset.device = d.device;
    return tr;
  }));
  $("no-devices").hidden = s.devices.length > 0;

  $("gaps").replaceChildren(...s.gaps.map((g) => {
    const st = el("td");
    st.append(el("span", g.state, `pill ${g.state}`));
    const tr = cellRow([el("td", g.first_seq === g.last_seq ? `${g.first_seq}` : `${g.first_seq}–${g.last_seq}`),
                        el("td", g.count), st, el("td", ago(g.detected_at))]);
    tr.dataset.state = g.state;
    return tr;
  }));
  $("no-gaps").hidden = s.gaps.length > 0;

  $("changes").replaceChildren(...s.price_changes.map((c) => cellRow([
    el("td", c.batch_id), el("td", c.version ?? "–"), el("td", when(c.prepared_at)), el("td", when(c.committed_at)),
    el("td", when(c.confirmed_at)),
    el("td", c.rejected_at ? `rejected: ${c.reason}` : c.aborted_at ? `aborted: ${c.reason}` : c.confirmed_at ? "done" : "in progress"),
  ])));

  $("events").replaceChildren(...s.recent_events.map((e) => {
    const li = el("li");
    li.append(el("time", new Date(e.ts * 1000).toLocaleTimeString()), el("span", `#${e.seq}`, "muted"),
              el("span", e.kind), el("span", e.device, "muted"));
    return li;
  }));

  const open = s.alerts.filter((a) => !a.closed_at);
  if (open.length) setVerdict(open.some((a) => a.severity === "critical") ? "bad" : "warn",
                              open.map((a) => a.message).join(" · "));
  else if (s.online === false) setVerdict("warn", `Offline ${s.state_since ? "since " + ago(s.state_since) : ""}`);
  else setVerdict("ok", "No open alerts.");
  $("updated").textContent = new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    render(await getJSON(`/api/v1/stores/${encodeURIComponent(storeId)}`));
  } catch (err) {
    setVerdict("unknown", err.message);
  }
}

refresh();
setInterval(refresh, 5000);
