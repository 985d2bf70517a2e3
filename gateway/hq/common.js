// Shared by the fleet and store pages of `storelink hq serve` ($, el and duration come from the store page's
// dom.js). No build step, no framework; every value goes in through textContent, never innerHTML. Times from the
// API are epoch seconds.
"use strict";

function ago(epoch) {
  if (epoch == null) return "–";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 60) return "just now";
  return `${duration(s)} ago`;
}

function when(epoch) {
  return epoch == null ? "–" : new Date(epoch * 1000).toLocaleString();
}

const PROBLEM_LABELS = {
  offline: "offline", behind: "behind on prices", stale: "stale tills", devices: "device problems",
  drift: "label drift", gaps: "missing events", overcharge: "overcharges", backlog: "backlog",
  outdated: "old software",
};

const ALERT_ADVICE = {
  overcharge: "A customer paid more than the published price: refund, then check the till's price source.",
  seq_gap: "Events never arrived: check the broker's queue limits and the store's log.",
  price_behind: "The store does not run the latest prices: is it online? See its price changes.",
  stale_till: "A till missed a price change: bring it online so the store updates it.",
  label_drift: "Labels or tills disagree with the store's price book: reprint labels.",
  price_rejected: "The store refused a price batch: see the reason and publish a corrected one.",
  price_aborted: "A price change did not take: a device refused or missed the deadline.",
};

function alertItem(a, withStore) {
  const li = el("li", null, `alert ${a.severity}`);
  li.dataset.kind = a.kind;
  const head = el("div", null, "alert-head");
  head.append(el("span", a.kind.replace("_", " "), `pill ${a.severity}`));
  if (withStore) {
    const link = el("a", a.store_id);
    link.href = `/store?id=${encodeURIComponent(a.store_id)}`;
    head.append(link);
  }
  head.append(el("time", ago(a.opened_at), "muted"));
  li.append(head, el("div", a.message));
  if (ALERT_ADVICE[a.kind]) li.append(el("div", ALERT_ADVICE[a.kind], "muted"));
  if (a.closed_at) li.append(el("div", `closed ${ago(a.closed_at)}`, "muted"));
  return li;
}

async function getJSON(url) {
  const resp = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function setVerdict(level, text) {
  const v = $("verdict");
  v.className = `verdict ${level}`;
  v.textContent = text;
}
