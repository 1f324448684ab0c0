import { api } from "../api.js";
import { clear, fmtTime, h, kindBadge, pager, statusBadge } from "../dom.js";

const state = { offset: 0, limit: 25, status: "" };
const STATUSES = [["", "All"], ["active", "In progress"], ["finished", "Finished"], ["pending_approval", "Awaiting approval"],
  ["scheduled", "Scheduled"], ["rejected", "Rejected"], ["approval_expired", "Approval expired"], ["cancelled", "Cancelled"]];

export async function render(main, _args, signal) {
  const body = h("div", {});
  const sel = h("select", { id: "history-status", "aria-label": "status", onchange: () => { state.status = sel.value; state.offset = 0; load(); } },
    ...STATUSES.map(([v, l]) => h("option", { value: v, selected: state.status === v }, l)));
  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Instruction history")),
    h("section", { class: "card" }, h("div", { class: "toolbar" }, sel, h("div", { class: "spacer" }),
      h("button", { type: "button", class: "btn btn-small", onclick: () => load() }, "Refresh")), body));

  async function load() {
    const q = new URLSearchParams({ offset: String(state.offset), limit: String(state.limit) });
    if (state.status) q.set("status", state.status);
    const page = await api("GET", `/Instructions?${q}`, undefined, { signal });
    if (!page.items.length) { clear(body, h("p", { class: "empty" }, "No instructions yet. ", h("a", { href: "#/ask" }, "Ask a question"), ".")); return; }
    const n = (s, k) => String(s.states[k] || 0);
    clear(body, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "history-table" },
      h("thead", {}, h("tr", {}, ...["#", "Name", "Kind", "Status", "Requested by", "Created", "Targeted", "Success", "No content", "Error", "Other"].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...page.items.map((s) => {
        const other = Object.entries(s.states).filter(([k]) => !["success", "nocontent", "error"].includes(k)).reduce((a, [, v]) => a + v, 0);
        return h("tr", { class: "clickable", onclick: () => { location.hash = `#/i/${s.id}`; } },
          h("td", {}, h("a", { href: `#/i/${s.id}` }, String(s.id))), h("td", { class: "name" }, s.name,
            h("div", { class: "payload-preview mono" }, s.payload.split("\n").join(" ").slice(0, 120))),
          h("td", {}, kindBadge(s.kind)), h("td", {}, statusBadge(s.status)), h("td", {}, s.created_by),
          h("td", { class: "nowrap" }, fmtTime(s.created_at)), h("td", { class: "num" }, String(s.targeted)),
          h("td", { class: "num" }, n(s, "success")), h("td", { class: "num" }, n(s, "nocontent")),
          h("td", { class: "num" }, n(s, "error")), h("td", { class: "num" }, String(other)));
      })))),
    pager({ offset: state.offset, limit: state.limit, total: page.total, onPage: (o) => { state.offset = o; load(); } }));
  }
  await load();
}
