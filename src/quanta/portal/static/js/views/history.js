// Instruction history with a search (status, who requested it, a part of its name, created from /
// to), done by the server (GET /Instructions filters in SQL). The search lives in the fragment
// (#/history?status=finished&user=alice&name=disk&from=2026-12-01T08:00&to=...&offset=25), so a
// search can be linked to and survives a reload. Rows of instructions still running follow live.
import { api } from "../api.js";
import { clear, fmtTime, h, keepLive, kindBadge, message, pager, statusBadge } from "../dom.js";

const LIMIT = 25;
const DONE = ["finished", "cancelled", "rejected", "approval_expired", "expired"];
const STATUSES = [["", "All statuses"], ["active", "In progress"], ["created", "Issuing"], ["finished", "Finished"],
  ["pending_approval", "Awaiting approval"], ["scheduled", "Scheduled"], ["rejected", "Rejected"],
  ["approval_expired", "Approval expired"], ["cancelled", "Cancelled"], ["expired", "Never issued"]];
const LOCAL_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?$/; // an <input type=datetime-local> value

// <input type=datetime-local> value (local time) -> unix seconds, or null
function unix(v) {
  if (!v || !LOCAL_TIME.test(v)) return null;
  const t = new Date(v).getTime();
  return Number.isFinite(t) ? t / 1000 : null;
}

function fromQuery(query) {
  const text = (k, n) => (query.get(k) || "").slice(0, n);
  const off = Number(query.get("offset"));
  return { status: STATUSES.some(([v]) => v === query.get("status")) ? query.get("status") : "",
    user: text("user", 128), name: text("name", 255), from: LOCAL_TIME.test(text("from", 19)) ? text("from", 19) : "",
    to: LOCAL_TIME.test(text("to", 19)) ? text("to", 19) : "", offset: Number.isInteger(off) && off > 0 ? off : 0 };
}

export async function render(main, _args, signal, query = new URLSearchParams()) {
  const state = fromQuery(query);
  const body = h("div", { id: "history-results" });
  const status = h("div", { class: "form-status", id: "history-status" });
  const field = (id, label, el) => h("div", { class: "field" }, h("label", { for: id }, label), el);
  const fStatus = h("select", { id: "history-status-filter", "aria-label": "status" },
    ...STATUSES.map(([v, l]) => h("option", { value: v, selected: state.status === v }, l)));
  const fUser = h("input", { id: "history-user", type: "search", maxlength: "128", value: state.user, placeholder: "user name", autocomplete: "off" });
  const fName = h("input", { id: "history-name", type: "search", maxlength: "255", value: state.name, placeholder: "part of the name" });
  const fFrom = h("input", { id: "history-from", type: "datetime-local", value: state.from });
  const fTo = h("input", { id: "history-to", type: "datetime-local", value: state.to });
  let generation = 0; // a new search ends the live updates of the one before

  function remember() {
    const q = new URLSearchParams();
    if (state.status) q.set("status", state.status);
    for (const k of ["user", "name", "from", "to"]) if (state[k]) q.set(k, state[k]);
    if (state.offset) q.set("offset", String(state.offset));
    const hash = `#/history${[...q].length ? `?${q}` : ""}`;
    if (location.hash !== hash) history.replaceState(null, "", hash); // no hashchange: the view stays
  }

  const form = h("form", { class: "toolbar history-search", id: "history-search", onsubmit: (ev) => {
    ev.preventDefault();
    Object.assign(state, { status: fStatus.value, user: fUser.value.trim(), name: fName.value.trim(),
      from: fFrom.value, to: fTo.value, offset: 0 });
    search();
  } },
  field("history-status-filter", "Status", fStatus), field("history-user", "Requested by", fUser),
  field("history-name", "Name", fName), field("history-from", "Created from", fFrom), field("history-to", "to", fTo),
  h("div", { class: "field" }, h("button", { type: "submit", class: "btn btn-primary", id: "history-go" }, "Search")),
  h("div", { class: "field" }, h("button", { type: "button", class: "btn btn-link", id: "history-clear", onclick: () => {
    Object.assign(state, { status: "", user: "", name: "", from: "", to: "", offset: 0 });
    for (const el of [fUser, fName, fFrom, fTo]) el.value = "";
    fStatus.value = "";
    search();
  } }, "Clear")));

  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Instruction history")),
    h("section", { class: "card" }, form, status, body));

  async function fetchPage() {
    const q = new URLSearchParams({ offset: String(state.offset), limit: String(LIMIT) });
    if (state.status) q.set("status", state.status);
    if (state.user) q.set("created_by", state.user);
    if (state.name) q.set("name", state.name);
    const since = unix(state.from);
    const until = unix(state.to);
    if (since !== null) q.set("since", String(since));
    if (until !== null) q.set("until", String(until));
    return api("GET", `/Instructions?${q}`, undefined, { signal });
  }

  function draw(page) {
    if (!page.items.length) {
      const searching = state.status || state.user || state.name || state.from || state.to;
      clear(body, h("p", { class: "empty" }, searching ? "No instruction matches this search."
        : ["No instructions yet. ", h("a", { href: "#/ask" }, "Ask a question"), "."]));
      return;
    }
    const n = (s, k) => String(s.states[k] || 0);
    clear(body, h("p", { class: "muted small", id: "history-count" }, `${page.total} instruction${page.total === 1 ? "" : "s"}`),
      h("div", { class: "table-wrap" }, h("table", { class: "data", id: "history-table" },
        h("thead", {}, h("tr", {}, ...["#", "Name", "Kind", "Status", "Requested by", "Created", "Targeted", "Success", "No content", "Error", "Other"].map((c) => h("th", {}, c)))),
        h("tbody", {}, ...page.items.map((s) => {
          const other = Object.entries(s.states).filter(([k]) => !["success", "nocontent", "error"].includes(k)).reduce((a, [, v]) => a + v, 0);
          return h("tr", { class: "clickable", dataset: { id: String(s.id) }, onclick: () => { location.hash = `#/i/${s.id}`; } },
            h("td", { class: "id" }, h("a", { href: `#/i/${s.id}` }, String(s.id))), h("td", { class: "name" }, s.name,
              h("div", { class: "payload-preview mono" }, s.payload.split("\n").join(" ").slice(0, 120))),
            h("td", {}, kindBadge(s.kind)), h("td", { class: "status" }, statusBadge(s.status)), h("td", {}, s.created_by),
            h("td", { class: "nowrap" }, fmtTime(s.created_at)), h("td", { class: "num" }, String(s.targeted)),
            h("td", { class: "num" }, n(s, "success")), h("td", { class: "num" }, n(s, "nocontent")),
            h("td", { class: "num" }, n(s, "error")), h("td", { class: "num" }, String(other)));
        })))),
      pager({ offset: state.offset, limit: LIMIT, total: page.total, onPage: (o) => { state.offset = o; search(); } }));
  }

  async function search() {
    const run = ++generation;
    remember();
    clear(status);
    let page;
    try {
      page = await fetchPage();
    } catch (e) {
      if (e.name === "AbortError" || signal.aborted) return;
      clear(status, message("error", e.message || String(e)));
      clear(body);
      return;
    }
    if (run !== generation) return;
    draw(page);
    // live: while a shown instruction is not done, its row follows (polled with backoff)
    keepLive(page, async () => {
      if (run !== generation) return null;
      const next = await fetchPage();
      if (run === generation) draw(next);
      return next;
    }, (p) => run === generation && p !== null && p.items.some((s) => !DONE.includes(s.status)), signal);
  }
  await search();
}
