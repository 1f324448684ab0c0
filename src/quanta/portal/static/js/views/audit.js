// The audit log (Full Administrators): filters (actor, action, object, from, to), paging, and a
// CSV download of every row that matches. Read only, as the API is.
import { api, download } from "../api.js";
import { cellText, clear, fmtTime, h, message, pager } from "../dom.js";

const state = { offset: 0, limit: 50, actor: "", action: "", object: "", since: "", until: "" };

// <input type=datetime-local> value (local time) -> unix seconds, or null
function unix(v) {
  if (!v) return null;
  const t = new Date(v).getTime();
  return Number.isFinite(t) ? t / 1000 : null;
}

function query(extra) {
  const q = new URLSearchParams(extra);
  for (const k of ["actor", "action", "object"]) if (state[k]) q.set(k, state[k]);
  const since = unix(state.since);
  const until = unix(state.until);
  if (since !== null) q.set("since", String(since));
  if (until !== null) q.set("until", String(until));
  return q;
}

function change(e) {
  if (e.before === null && e.after === null) return Object.keys(e.details || {}).length ? cellText(e.details) : "";
  return `${cellText(e.before)} → ${cellText(e.after)}`;
}

export async function render(main, _args, signal) {
  const body = h("div", {});
  const status = h("div", { class: "form-status" });
  const field = (k, label, type = "search") => {
    const el = h("input", { id: `audit-${k}`, type, value: state[k], "aria-label": label, placeholder: label, maxlength: "255" });
    return h("div", {}, h("label", { for: `audit-${k}` }, label), el);
  };
  const fields = [field("actor", "Actor"), field("action", "Action"), field("object", "Object"),
    field("since", "From", "datetime-local"), field("until", "To", "datetime-local")];
  const form = h("form", { class: "toolbar audit-filters", id: "audit-filters", onsubmit: (ev) => {
    ev.preventDefault();
    for (const k of ["actor", "action", "object", "since", "until"]) state[k] = document.getElementById(`audit-${k}`).value.trim();
    state.offset = 0;
    load();
  } }, ...fields,
  h("button", { class: "btn btn-small btn-primary", type: "submit", id: "audit-apply" }, "Apply"),
  h("div", { class: "spacer" }),
  h("button", { class: "btn btn-small", type: "button", id: "audit-csv", onclick: async () => {
    clear(status);
    try {
      await download(`/Audit?${query({ format: "csv" })}`, "quanta-audit.csv", { signal });
    } catch (e) {
      if (e.name !== "AbortError") clear(status, message("error", e.message));
    }
  } }, "Download CSV"));

  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Audit log"),
    h("p", { class: "muted" }, "Every sign-in, sign-out, instruction, approval and administrative change: who, from where, what, before and after. Rows cannot be changed.")),
  h("section", { class: "card" }, form, status, body));

  async function load() {
    clear(status);
    let page;
    try {
      page = await api("GET", `/Audit?${query({ offset: String(state.offset), limit: String(state.limit) })}`, undefined, { signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      clear(body);
      clear(status, message("error", e.message));
      return;
    }
    if (!page.items.length) { clear(body, h("p", { class: "empty", id: "audit-empty" }, "No audit row matches.")); return; }
    clear(body, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "audit-table" },
      h("thead", {}, h("tr", {}, ...["Time", "Actor", "Source", "Action", "Object", "Change"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...page.items.map((e) => h("tr", { dataset: { id: String(e.id) } },
        h("td", { class: "nowrap" }, fmtTime(e.at)), h("td", { class: "audit-actor" }, e.actor), h("td", {}, e.source),
        h("td", { class: "audit-action" }, e.action), h("td", { class: "audit-object" }, e.object),
        h("td", { class: "audit-change mono small" }, change(e))))))),
    pager({ offset: state.offset, limit: state.limit, total: page.total, onPage: (o) => { state.offset = o; load(); } }));
  }
  await load();
}
