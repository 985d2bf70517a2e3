// The fleet page: every store, filtered by group, problem and id; keyset pages of PAGE stores.
"use strict";

const PAGE = 100;
const params = new URLSearchParams(location.search);
const state = { group: params.get("group") || "", problem: params.get("problem") || "", q: params.get("q") || "",
                cursors: [""], next: null };

function query(extra) {
  const p = new URLSearchParams();
  if (state.group) p.set("group", state.group);
  if (state.problem) p.set("problem", state.problem);
  if (state.q) p.set("q", state.q);
  for (const [k, v] of Object.entries(extra || {})) if (v) p.set(k, v);
  return p;
}

function linkCell(s) {
  const td = el("td");
  if (s.online === null) td.append(el("span", "unknown", "pill unknown"));
  else td.append(el("span", s.online ? "online" : "offline", `pill ${s.online ? "ok" : "offline"}`));
  td.append(el("div", s.state_since ? `since ${ago(s.state_since)}` : "", "muted"));
  return td;
}

function pricesCell(s) {
  const td = el("td");
  const v = s.price_version == null ? "none" : `v${s.price_version}`;
  const behind = s.problems.includes("behind");
  td.append(el("span", v, behind ? "problem" : ""));
  if (s.latest_published != null) td.append(el("div", `latest v${s.latest_published}`, "muted"));
  if (s.price_pending) td.append(el("div", s.price_pending, "muted"));
  return td;
}

function devicesCell(s) {
  const td = el("td");
  const bad = s.devices_bad || [];
  const stale = s.stale_devices || [];
  if (!bad.length && !stale.length) td.append(el("span", s.devices_total ? `${s.devices_total} ok` : "–"));
  for (const d of bad) td.append(el("div", `${d.device}: ${d.state}`, "warning"));
  for (const d of stale) td.append(el("div", `${d}: stale prices`, "warning"));
  return td;
}

function outboxCell(s) {
  const td = el("td");
  if (s.outbox_depth == null) { td.textContent = "–"; return td; }
  td.append(el("span", s.outbox_depth === 0 ? "empty" : `${s.outbox_depth} waiting`,
               s.problems.includes("backlog") ? "problem" : ""));
  if (s.outbox_depth && s.outbox_oldest_at) td.append(el("div", `oldest ${ago(s.outbox_oldest_at)}`, "muted"));
  return td;
}

function renderStores(page) {
  const body = $("stores");
  body.replaceChildren();
  $("empty").hidden = page.stores.length > 0;
  for (const s of page.stores) {
    const tr = el("tr");
    tr.dataset.store = s.store_id;
    tr.dataset.problems = s.problems.join(" ");
    const name = el("td");
    const a = el("a", s.store_id);
    a.href = `/store?id=${encodeURIComponent(s.store_id)}`;
    name.append(a);
    if (s.groups.length) name.append(el("div", s.groups.join(", "), "muted"));
    const alerts = el("td", s.open_alerts ? String(s.open_alerts) : "–", s.open_alerts ? "problem" : "");
    tr.append(name, linkCell(s), el("td", s.version || "–", s.problems.includes("outdated") ? "warning" : ""),
              pricesCell(s), devicesCell(s), outboxCell(s), el("td", ago(s.last_seen)), alerts);
    body.append(tr);
  }
  const first = (state.cursors.length - 1) * PAGE;
  $("page-info").textContent = page.total ? `${first + 1}-${first + page.stores.length} of ${page.total}` : "";
  $("prev").disabled = state.cursors.length <= 1;
  $("next").disabled = !page.next;
  state.next = page.next;
}

function renderChips(counts) {
  const box = $("problems");
  box.replaceChildren();
  const all = el("button", "all stores", state.problem ? "chip" : "chip active");
  all.type = "button";
  all.dataset.problem = "";
  box.append(all);
  for (const [p, label] of Object.entries(PROBLEM_LABELS)) {
    const b = el("button", `${label} (${counts[p] || 0})`, state.problem === p ? "chip active" : "chip");
    b.type = "button";
    b.dataset.problem = p;
    if (!counts[p] && state.problem !== p) b.classList.add("zero");
    box.append(b);
  }
}

function renderTotals(f) {
  $("fleet-size").textContent = `${f.stores} store${f.stores === 1 ? "" : "s"}`;
  $("t-online").textContent = f.online;
  $("t-offline").textContent = f.offline;
  const open = Object.values(f.open_alerts).reduce((a, b) => a + b, 0);
  $("t-alerts").textContent = open;
  $("t-prices").textContent = f.latest_price_version == null ? "none published" : `v${f.latest_price_version}`;
  $("t-outbox").textContent = `${f.outbox_depth} events`;
  const now = Date.now() / 1000;
  const live = f.workers.filter((w) => now - w.heartbeat_at < 30);
  $("t-ingest").textContent = `${live.length} of ${f.workers.length} worker${f.workers.length === 1 ? "" : "s"} running`;
  const problems = [];
  if (!live.length) problems.push(["bad", "No ingest worker is running: nothing new reaches head office."]);
  if (f.open_alerts.overcharge) problems.push(["bad", `${f.open_alerts.overcharge} overcharge${f.open_alerts.overcharge > 1 ? "s" : ""}`]);
  if (f.open_alerts.seq_gap) problems.push(["bad", `${f.open_alerts.seq_gap} store${f.open_alerts.seq_gap > 1 ? "s" : ""} with missing events`]);
  if (f.offline) problems.push(["warn", `${f.offline} offline`]);
  if (open && !problems.length) problems.push(["warn", `${open} open alert${open > 1 ? "s" : ""}`]);
  if (!problems.length) setVerdict("ok", "All stores reporting, no open alerts.");
  else setVerdict(problems.some(([l]) => l === "bad") ? "bad" : "warn", problems.map(([, t]) => t).join(" · "));
}

async function loadGroups() {
  const { groups } = await getJSON("/api/v1/groups");
  const sel = $("group");
  for (const g of groups) {
    const o = el("option", `${g.group} (${g.stores})`);
    o.value = g.group;
    sel.append(o);
  }
  sel.value = state.group;
}

async function refresh() {
  try {
    const cursor = state.cursors[state.cursors.length - 1];
    const page = await getJSON(`/api/v1/fleet?${query({ after: cursor, limit: String(PAGE) })}`);
    renderTotals(page.fleet);
    renderChips(page.problem_counts);
    renderStores(page);
    const alerts = await getJSON(`/api/v1/alerts?limit=20`);
    const list = $("alerts");
    list.replaceChildren(...alerts.alerts.map((a) => alertItem(a, true)));
    $("no-alerts").hidden = alerts.alerts.length > 0;
    $("updated").textContent = new Date().toLocaleTimeString();
  } catch (err) {
    setVerdict("unknown", `Cannot reach head office's database: ${err.message}`);
  }
}

function filtersChanged() {
  state.cursors = [""];
  history.replaceState(null, "", `?${query()}`);
  refresh();
}

$("problems").addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-problem]");
  if (!b) return;
  state.problem = b.dataset.problem;
  filtersChanged();
});
$("group").addEventListener("change", () => { state.group = $("group").value; filtersChanged(); });
$("search").value = state.q;
let typing = null;
$("search").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => { state.q = $("search").value.trim(); filtersChanged(); }, 250);
});
$("filters").addEventListener("submit", (ev) => ev.preventDefault());
$("next").addEventListener("click", () => { if (state.next) { state.cursors.push(state.next); refresh(); } });
$("prev").addEventListener("click", () => { if (state.cursors.length > 1) { state.cursors.pop(); refresh(); } });

loadGroups().catch(() => {});
refresh();
setInterval(refresh, 5000);
