// DOM helpers. Everything is built with createElement/textContent: no markup is ever parsed
// from data, so device-controlled strings (process names, tags, files) are always inert text.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) {
      if (typeof v !== "function") throw new Error("inline event handlers are not allowed");
      el.addEventListener(k.slice(2), v);
    } else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "checked" || k === "disabled" || k === "selected" || k === "hidden" || k === "required") el[k] = Boolean(v);
    else if (k === "href") el.setAttribute("href", safeHref(v));
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, String(v));
  }
  add(el, children);
  return el;
}

function add(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c)); // strings become text nodes
  }
}

// Only in-app links: a fragment or a same-origin path; never javascript: or data:.
function safeHref(v) {
  const s = String(v);
  return s.startsWith("#") || (s.startsWith("/") && !s.startsWith("//")) ? s : "#";
}

export function clear(el, ...children) {
  el.replaceChildren();
  add(el, children);
  return el;
}

export function cellText(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

export function fmtTime(t) {
  if (!t) return "—";
  const d = new Date(t * 1000);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function fmtAgo(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export const STATES = ["success", "nocontent", "error", "notapplicable", "expired", "offline", "sent", "pending"];
export const STATE_LABEL = {
  success: "Success", nocontent: "No content", error: "Error", notapplicable: "Not applicable",
  expired: "Expired", offline: "Offline", sent: "Sent", pending: "Pending",
};

export function stateBadge(state) {
  return h("span", { class: `badge st-${cssToken(state)}` }, STATE_LABEL[state] || state);
}

const STATUS_LABEL = {
  created: "Issuing", active: "In progress", finished: "Finished", cancelled: "Cancelled",
  pending_approval: "Awaiting approval", scheduled: "Scheduled", rejected: "Rejected",
  approval_expired: "Approval expired", new: "New",
};

export function statusBadge(status) {
  return h("span", { class: `badge status-${cssToken(status)}` }, STATUS_LABEL[status] || status);
}

export function kindBadge(kind) {
  return h("span", { class: `badge kind-${cssToken(kind)}` }, kind === "action" ? "Action" : "Question");
}

export function cssToken(s) {
  return String(s).toLowerCase().replace(/[^a-z0-9_-]/g, "");
}

export function message(kind, ...text) {
  return h("div", { class: `msg msg-${kind}`, role: kind === "error" ? "alert" : "status" }, ...text);
}

export function pager({ offset, limit, total, onPage }) {
  const from = total === 0 ? 0 : offset + 1;
  const to = Math.min(offset + limit, total);
  return h("div", { class: "pager" },
    h("button", { class: "btn btn-small", type: "button", disabled: offset <= 0, "data-test": "prev",
      onclick: () => onPage(Math.max(0, offset - limit)) }, "‹ Previous"),
    h("span", { class: "pager-info" }, `${from}–${to} of ${total}`),
    h("button", { class: "btn btn-small", type: "button", disabled: offset + limit >= total, "data-test": "next",
      onclick: () => onPage(offset + limit) }, "Next ›"));
}

// "site=paris\nowner=ops" <-> {site: "paris", owner: "ops"} (tags and attributes as typed; NAME
// as the API takes it: 1-64 of letters, digits, _ . -). A bad line is an Error naming it.
const PAIR_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

export function parsePairs(what, text) {
  const out = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const eq = line.indexOf("=");
    const k = eq < 0 ? line : line.slice(0, eq).trim();
    if (eq < 0 || !PAIR_NAME.test(k)) throw new Error(`${what}: "${line.slice(0, 80)}" is not NAME=VALUE (NAME: letters, digits, _ . -)`);
    out[k] = line.slice(eq + 1).trim();
  }
  return out;
}

export function pairsText(m) {
  return Object.entries(m || {}).map(([k, v]) => `${k}=${v}`).join("\n");
}

// After a first load() that returned ``first``, loads again while more(result) says something may
// still change: after FAST ms, then doubling while the result stays the same, up to SLOW (an
// error: SLOW); stops when the view's signal aborts. For lists whose rows change state (the
// history, a device's instructions): their status badges follow without a reload.
export function keepLive(first, load, more, signal, { fast = 2000, slow = 30000 } = {}) {
  let delay = fast;
  let last = JSON.stringify(first);
  const tick = async () => {
    if (signal.aborted) return;
    try {
      const got = await load();
      if (signal.aborted || !more(got)) return;
      const key = JSON.stringify(got);
      delay = key === last ? Math.min(delay * 2, slow) : fast;
      last = key;
    } catch (e) {
      if (signal.aborted || e.name === "AbortError") return;
      delay = slow;
    }
    setTimeout(tick, delay);
  };
  if (more(first)) setTimeout(tick, delay);
}
