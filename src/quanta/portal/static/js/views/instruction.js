import { api, session, stream } from "../api.js";
import { cellText, clear, fmtTime, h, kindBadge, message, pager, stateBadge, STATE_LABEL, STATES, statusBadge } from "../dom.js";
import { approvalProgress } from "./approvals.js";

const DONE = ["finished", "cancelled", "rejected", "approval_expired", "expired"];

// An approved action the Core has not taken (status created, with the reason in issue_error), or
// never took before its gather window ended (status expired): said so, not "Issuing".
function badgeOf(st) {
  if (st.status === "created" && st.issue_error) return h("span", { class: "badge status-created" }, "Approved, not issued yet");
  if (st.status === "expired") return h("span", { class: "badge status-expired" }, "Never issued");
  return statusBadge(st.status);
}
const AGG_GROUPS = 1000; // groups the server returns for an aggregate (largest first)
const BY_STATE = "Device state"; // grouped from the counts per state, not from rows

const SIZES = [25, 100, 500, 1000];
const PAGE = 100; // result rows per page by default: only a page is ever in the DOM
const FILTER_OPS = ["eq", "ne", "lt", "le", "gt", "ge", "contains", "startswith", "empty", "nonempty"];
const BYTES = /(^|[^a-z])(size|bytes|memory|mem|ram|rss|vsz|disk|free|used|capacity)([^a-z]|$)/i;
const TIMES = /(time|date|started|created|modified|boot|seen|_at$|at$|when|install)/i;

// Cells: numbers in a column named like a size print as bytes, epoch seconds in a column named
// like a time print as a local time; the raw value stays in the title.
function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i += 1; }
  return `${n < 0 ? "-" : ""}${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${u[i]}`;
}

function formatCell(column, v) {
  if (typeof v === "number" && Number.isFinite(v)) {
    if (BYTES.test(column) && v >= 0) return fmtBytes(v);
    if (TIMES.test(column) && v > 1e8 && v < 1e11) return fmtTime(v);
  }
  return cellText(v);
}

export async function render(main, args, signal, query = new URLSearchParams()) {
  const id = Number(args[0]);
  if (!Number.isInteger(id) || id <= 0) throw new Error("no such instruction");
  let st = await api("GET", `/Instructions/${id}`, undefined, { signal });
  // The view's state lives in the fragment's query, so a results page can be linked to.
  const int = (k, d) => { const v = query.has(k) ? Number(query.get(k)) : NaN; return Number.isInteger(v) && v >= 0 ? v : d; };
  const view = { mode: query.get("view") === "aggregate" ? "agg" : "rows", state: STATES.includes(query.get("state")) ? query.get("state") : "",
    offset: int("offset", 0), limit: Math.min(Math.max(int("limit", PAGE), 1), 1000), sort: (query.get("sort") || "").slice(0, 300),
    filter: (query.get("filter") || "").slice(0, 1000), device: (query.get("device") || "").slice(0, 255), aggBy: query.getAll("by").filter(Boolean).slice(0, 8),
    defaultBy: undefined, columns: [] }; // defaultBy: the definition's aggregation (null: none; undefined: not asked yet)
  function remember() {
    const q = new URLSearchParams();
    if (view.mode === "agg") { q.set("view", "aggregate"); for (const b of view.aggBy) q.append("by", b); }
    if (view.state && view.mode === "rows") q.set("state", view.state);
    if (view.mode === "rows" && view.offset) q.set("offset", String(view.offset));
    if (view.mode === "rows" && view.limit !== PAGE) q.set("limit", String(view.limit));
    if (view.mode === "rows" && view.sort) q.set("sort", view.sort);
    if (view.mode === "rows" && view.filter) q.set("filter", view.filter);
    if (view.mode === "rows" && view.device) q.set("device", view.device);
    const hash = `#/i/${id}${[...q].length ? `?${q}` : ""}`;
    if (location.hash !== hash) history.replaceState(null, "", hash); // no hashchange: the view stays
  }

  const head = h("div", { class: "page-head" });
  const progress = h("section", { class: "card progress-card", id: "progress" });
  const results = h("section", { class: "card", id: "results" });
  const liveNote = h("span", { class: "live", id: "live" });
  clear(main, head, progress, results);

  function drawHead() {
    const wasOpen = Boolean(head.querySelector("#payload") && head.querySelector("#payload").open);
    clear(head,
      h("h1", {}, `#${st.id} `, h("span", { class: "title-name" }, st.name)),
      h("div", { class: "meta" }, kindBadge(st.kind), " ", h("span", { id: "status" }, badgeOf(st)), " ", liveNote,
        h("span", { class: "muted" }, ` requested by ${st.created_by}`),
        st.issued_at ? h("span", { class: "muted" }, ` · issued ${fmtTime(st.issued_at)}`) : null,
        st.expires_at ? h("span", { class: "muted" }, ` · window ${DONE.includes(st.status) ? "closed" : "closes"} ${fmtTime(st.expires_at)}`) : null,
        st.decided_by ? h("span", { class: "muted" }, ` · decided by ${st.decided_by}${st.decision_reason ? ` (“${st.decision_reason}”)` : ""}`) : null,
        (st.approvals || []).length && st.status !== "pending_approval"
          ? h("span", { class: "muted", id: "approved-by" }, ` · approved by ${st.approvals.map((a) => a.approver).join(", ")}`) : null),
      st.instruction_set ? h("p", { class: "muted", id: "definition-note" }, "Instruction definition ",
        h("a", { href: `#/ask?definition=${encodeURIComponent(st.name)}` }, st.name), ` (instruction set ${st.instruction_set})`) : null,
      typeof st.payload === "string" ? h("details", { class: "payload", id: "payload" }, h("summary", {}, "Payload"),
        h("pre", { class: "code-block" }, st.payload),
        Object.keys(st.parameters || {}).length ? h("p", { class: "muted", id: "payload-parameters" }, `Parameters: ${JSON.stringify(st.parameters)}`) : null,
        h("p", { class: "muted" }, `Devices: ${st.devices ? st.devices.join(", ") : "all"}`)) : null);
    if (wasOpen && head.querySelector("#payload")) head.querySelector("#payload").open = true;
  }

  function total() {
    return Object.values(st.states).reduce((a, b) => a + b, 0);
  }

  function drawProgress() {
    const n = Math.max(st.targeted, total());
    const answered = ["success", "nocontent", "error", "notapplicable"].reduce((a, k) => a + (st.states[k] || 0), 0);
    const bar = h("div", { class: "bar", role: "img", "aria-label": "responses by state" },
      ...STATES.filter((k) => st.states[k]).map((k) =>
        h("span", { class: `seg st-${k}`, style: null, title: `${STATE_LABEL[k]}: ${st.states[k]}`, "data-width": String(st.states[k] / (n || 1)) })));
    for (const seg of bar.children) seg.style.width = `${(Number(seg.dataset.width) * 100).toFixed(2)}%`;
    clear(progress,
      h("div", { class: "progress-head" },
        h("div", { class: "big" }, h("span", { id: "answered" }, String(answered)), h("span", { class: "muted" }, ` of ${n} answered`)),
        st.status === "pending_approval" ? message("info", (st.approvers_required || 1) > 1
          ? `This action needs ${st.approvers_required} approvals by different people other than ${st.created_by}. `
          : "This action waits for a second person's approval. ",
        h("span", { id: "approval-progress", "data-test": "approval-progress" }, `${approvalProgress(st.approvers_required, st.approvals)}. `),
        h("a", { href: "#/approvals" }, "Approvals")) : null,
        st.status === "created" && st.issue_error ? message("info", h("span", { id: "not-issued" },
          `Approved, not issued yet: ${st.issue_error}. The Coordinator issues it as soon as the Core takes it, while its window lasts.`)) : null,
        st.status === "expired" ? message("error", h("span", { id: "not-issued" },
          `Never issued: ${st.issue_error || "the Core did not take it before its gather window ended"}. It did not run.`)) : null,
        st.status === "scheduled" ? message("info", `Scheduled for ${fmtTime(st.scheduled_at)}.`) : null),
      bar,
      h("div", { class: "counts", id: "counts" },
        h("div", { class: "count", "data-state": "targeted" }, h("span", { class: "num" }, String(st.targeted)), h("span", { class: "lbl" }, "Targeted")),
        ...STATES.map((k) => h("div", { class: `count st-border-${k}${st.states[k] ? "" : " zero"}`, "data-state": k },
          h("span", { class: "num" }, String(st.states[k] || 0)), h("span", { class: "lbl" }, STATE_LABEL[k])))));
  }

  // ------------------------------------------------------------- results
  // The grid's query: rows paged, sorted and filtered by the server (/Responses' only paging).
  function rowQuery() {
    const q = new URLSearchParams();
    if (view.state) q.set("status", view.state);
    if (view.sort) q.set("sort", view.sort);
    if (view.filter) q.set("filter", view.filter);
    if (view.device) q.set("device", view.device);
    return q;
  }

  async function loadRows() {
    const q = rowQuery();
    q.set("offset", String(view.offset));
    q.set("limit", String(view.limit));
    return api("GET", `/Instructions/${id}/Responses?${q}`, undefined, { signal });
  }

  // Export (CSV) of what the grid shows, every page: the API streams it; the token is sent as a
  // header (never in a URL), so the file is fetched and handed to the browser as a download.
  async function exportCsv(button) {
    const q = rowQuery();
    q.set("format", "csv");
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "Exporting…";
    try {
      const s = session();
      const r = await fetch(`/Consumer/Instructions/${id}/Export?${q}`, { headers: s ? { Authorization: `Bearer ${s.token}` } : {}, cache: "no-store" });
      if (!r.ok) throw new Error(`export failed: HTTP ${r.status}`);
      const url = URL.createObjectURL(await r.blob());
      const a = document.createElement("a");
      a.href = url;
      a.download = `instruction-${id}.csv`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (e) {
      results.append(message("error", e.message));
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  // The columns the answers have (a one-row page names them all), for the group-by choices.
  async function sampleColumns() {
    if (view.columns.length) return;
    const page = await api("GET", `/Instructions/${id}/Responses?status=success&limit=1`, undefined, { signal });
    for (const c of page.columns) if (!view.columns.includes(c)) view.columns.push(c);
  }

  function toolbar() {
    const stateSel = h("select", { id: "state-filter", "aria-label": "state", onchange: () => { view.state = stateSel.value; view.offset = 0; drawResults(); } },
      h("option", { value: "" }, "All states"),
      ...STATES.map((k) => h("option", { value: k, selected: view.state === k }, `${STATE_LABEL[k]} (${st.states[k] || 0})`)));
    const sizeSel = h("select", { id: "page-size", "aria-label": "page size", onchange: () => { view.limit = Number(sizeSel.value); view.offset = 0; drawResults(); } },
      ...[...new Set([...SIZES, view.limit])].sort((a, b) => a - b).map((n) => h("option", { value: String(n), selected: view.limit === n }, `${n} row${n === 1 ? "" : "s"} per page`)));
    // The filter box: text matches device ids; "COLUMN:OP:VALUE" (e.g. Size:gt:1000000) filters a column.
    const typed = (t) => FILTER_OPS.some((op) => t.includes(`:${op}:`) || t.endsWith(`:${op}`));
    let timer = null;
    const filterBox = h("input", { id: "results-filter", type: "search", "aria-label": "filter", maxlength: "1000", spellcheck: "false",
      placeholder: "Filter: device, or Column:op:value", value: view.filter || view.device,
      oninput: () => { clearTimeout(timer); timer = setTimeout(apply, 350); }, onkeydown: (e) => { if (e.key === "Enter") { clearTimeout(timer); apply(); } } });
    function apply() {
      const t = filterBox.value.trim();
      const [filter, device] = typed(t) ? [t, ""] : ["", t];
      if (filter === view.filter && device === view.device) return;
      view.filter = filter; view.device = device; view.offset = 0;
      drawResults();
    }
    const exportBtn = h("button", { type: "button", class: "btn btn-small", id: "export-csv", onclick: () => exportCsv(exportBtn) }, "Export CSV");
    const tabs = h("div", { class: "tabs", role: "tablist" },
      h("button", { type: "button", role: "tab", class: view.mode === "rows" ? "tab active" : "tab", id: "tab-rows",
        onclick: () => { view.mode = "rows"; drawResults(); } }, "Results"),
      h("button", { type: "button", role: "tab", class: view.mode === "agg" ? "tab active" : "tab", id: "tab-agg",
        onclick: () => { view.mode = "agg"; drawResults(); } }, "Aggregate"));
    const rows = view.mode === "rows";
    return h("div", { class: "toolbar" }, tabs, h("div", { class: "spacer" }), rows ? filterBox : null, rows ? stateSel : null,
      rows ? sizeSel : null, rows ? exportBtn : null);
  }

  let drawing = null;
  async function drawResults() {
    const mine = {};
    drawing = mine;
    remember();
    const body = h("div", { class: "results-body" }, h("div", { class: "loading" }, "Loading…"));
    if (!results.firstChild) clear(results, toolbar(), body);
    const focused = document.activeElement && document.activeElement.id === "results-filter"; // typing goes on
    let content;
    try {
      content = view.mode === "rows" ? await rowsView() : await aggView();
    } catch (e) {
      if (signal.aborted) return;
      content = message("error", e.message);
    }
    if (drawing !== mine) return; // a newer draw won
    clear(results, toolbar(), h("div", { class: "results-body" }, content));
    const box = results.querySelector("#results-filter");
    if (focused && box) { box.focus(); box.setSelectionRange(box.value.length, box.value.length); }
  }

  async function rowsView() {
    let page;
    try {
      page = await loadRows();
    } catch (e) {
      if (e.status !== 422 || !(view.sort || view.filter)) throw e;
      // a shared link naming a column these answers do not have: say so, keep the grid usable
      view.sort = ""; view.filter = ""; view.offset = 0;
      page = await loadRows();
      page.note = e.message;
    }
    const cols = page.columns;
    for (const c of cols) if (!view.columns.includes(c)) view.columns.push(c);
    const desc = view.sort.startsWith("-");
    const sortKey = desc ? view.sort.slice(1) : view.sort;
    const header = (label, key) => {
      const on = sortKey === key;
      const next = !on ? key : desc ? "" : `-${key}`; // none -> ascending -> descending -> none
      return h("th", { class: on ? "sortable sorted" : "sortable", "data-sort": key, "aria-sort": on ? (desc ? "descending" : "ascending") : "none",
        title: `sort by ${label}`, onclick: () => { view.sort = next; view.offset = 0; drawResults(); } },
        label, on ? h("span", { class: "sort-mark", "aria-hidden": "true" }, desc ? " ▼" : " ▲") : null);
    };
    const trs = page.rows.map((r) => h("tr", {},
      h("td", { class: "device" }, r.device), h("td", {}, stateBadge(r.status)),
      ...cols.map((c, i) => {
        const v = r.cells[i];
        const t = formatCell(c, v);
        return h("td", { class: r.index === null ? "muted" : null, title: t !== cellText(v) ? cellText(v) : null }, t);
      }),
      h("td", { class: r.error ? "err" : "muted" }, r.error || "")));
    const note = page.note ? message("error", page.note) : null;
    if (!trs.length) {
      return h("div", {}, note, h("p", { class: "empty" }, view.filter || view.device || view.state ? "No rows match."
        : st.status === "pending_approval" ? "No responses until the action is approved." : "No responses yet."));
    }
    return h("div", {}, note,
      h("div", { class: "table-wrap" }, h("table", { class: "data", id: "results-table" },
        h("thead", {}, h("tr", {}, header("Device", "device"), header("State", "status"), ...cols.map((c) => header(c, c)), header("Error", "error"))),
        h("tbody", {}, ...trs))),
      pager({ offset: view.offset, limit: view.limit, total: page.total, onPage: (o) => { view.offset = o; drawResults(); } }));
  }

  // Aggregates are computed by the server over every answer (GET .../Aggregate): by default
  // the definition's aggregation, else the first column; "Device state" uses the counts.
  async function aggView() {
    let agg = null;
    if (view.defaultBy === undefined) {
      try {
        agg = await api("GET", `/Instructions/${id}/Aggregate?limit=${AGG_GROUPS}`, undefined, { signal });
        view.defaultBy = agg.by;
      } catch (e) {
        if (e.status !== 422) throw e;
        view.defaultBy = null; // no definition aggregation: the user picks a column
      }
    }
    if (!view.aggBy.length && view.defaultBy) view.aggBy = [...view.defaultBy];
    await sampleColumns();
    for (const c of [...(view.defaultBy || []), ...view.aggBy]) if (c !== BY_STATE && !view.columns.includes(c)) view.columns.push(c);
    if (view.aggAuto && view.columns.length) view.aggBy = []; // picked before any answer had columns
    view.aggAuto = !view.aggBy.length && !view.columns.length;
    if (!view.aggBy.length) view.aggBy = [view.columns[0] || BY_STATE];
    if (view.aggBy[0] === BY_STATE) view.aggBy = [BY_STATE];
    remember();
    const byState = view.aggBy[0] === BY_STATE;
    if (!byState && !(agg && JSON.stringify(agg.by) === JSON.stringify(view.aggBy))) {
      const q = new URLSearchParams({ limit: String(AGG_GROUPS) });
      for (const b of view.aggBy) q.append("by", b);
      agg = await api("GET", `/Instructions/${id}/Aggregate?${q}`, undefined, { signal });
    }
    const groups = byState
      ? STATES.filter((k) => st.states[k]).map((k) => ({ values: [STATE_LABEL[k]], rows: st.states[k], devices: st.states[k] }))
        .sort((a, b) => b.rows - a.rows)
      : agg.groups;

    const setBy = (i, v) => {
      const next = view.aggBy.slice(0, i);
      if (v) next.push(v, ...view.aggBy.slice(i + 1).filter((x) => x !== v));
      else next.push(...view.aggBy.slice(i + 1));
      view.aggBy = next.length ? next : [view.columns[0] || BY_STATE];
      view.aggAuto = false;
      drawResults();
    };
    const selects = view.aggBy.map((b, i) => {
      const sel = h("select", { id: i === 0 ? "agg-column" : `agg-column-${i + 1}`, "aria-label": i === 0 ? "group by" : `then by (${i + 1})`,
        onchange: () => setBy(i, sel.value) },
        i === 0 ? h("option", { value: BY_STATE, selected: byState }, BY_STATE) : h("option", { value: "" }, "— remove —"),
        ...view.columns.map((c) => h("option", { value: c, selected: c === b }, c)));
      return sel;
    });
    const more = view.columns.filter((c) => !view.aggBy.includes(c));
    const thenSel = !byState && more.length && view.aggBy.length < 8
      ? h("select", { id: "agg-then", "aria-label": "then by", onchange: () => { if (thenSel.value) { view.aggBy = [...view.aggBy, thenSel.value]; drawResults(); } } },
        h("option", { value: "" }, "then by…"), ...more.map((c) => h("option", { value: c }, c)))
      : null;
    const isDefault = view.defaultBy && JSON.stringify(view.defaultBy) === JSON.stringify(view.aggBy);
    const summary = byState ? `${total()} devices by state`
      : `${agg.devices} answering device${agg.devices === 1 ? "" : "s"}`
        + (agg.missing ? `, ${agg.missing} without ${view.aggBy.join(" or ")}` : "")
        + (agg.truncated ? ` · the largest ${groups.length} groups` : "");

    const max = groups.length ? Math.max(...groups.map((g) => g.rows)) : 1;
    const rows = groups.map((g) => {
      const meter = h("span", { class: "meter-fill" });
      meter.style.width = `${((g.rows / max) * 100).toFixed(1)}%`;
      return h("tr", {}, ...g.values.map((v) => {
        const t = cellText(v);
        return h("td", { class: t === "" ? "muted" : null }, t === "" ? "(empty)" : t);
      }),
      h("td", { class: "num" }, String(g.rows)), h("td", { class: "num" }, String(g.devices)),
      h("td", { class: "meter-cell" }, h("span", { class: "meter" }, meter)));
    });
    return h("div", {},
      h("div", { class: "agg-controls" }, h("label", { for: "agg-column" }, "Group by"), ...selects, thenSel,
        view.defaultBy && !isDefault ? h("button", { type: "button", class: "btn btn-link", id: "agg-default",
          onclick: () => { view.aggBy = [...view.defaultBy]; drawResults(); } }, `Definition's grouping (${view.defaultBy.join(", ")})`) : null,
        h("span", { class: "muted", id: "agg-summary" }, summary)),
      rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "data agg", id: "agg-table" },
        h("thead", {}, h("tr", {}, ...view.aggBy.map((b) => h("th", {}, b)), h("th", { class: "num" }, "Rows"), h("th", { class: "num" }, "Devices"), h("th", {}, ""))),
        h("tbody", {}, ...rows))) : h("p", { class: "empty" }, "Nothing to aggregate yet."));
  }

  // ------------------------------------------------------------- live
  drawHead();
  drawProgress();
  drawResults();

  let lastCounts = JSON.stringify(st.states);
  let pending = null;
  const refresh = () => { // at most one results reload per 700 ms while answers arrive
    if (pending) return;
    pending = setTimeout(() => { pending = null; if (!signal.aborted) drawResults(); }, 700);
  };
  if (!DONE.includes(st.status)) {
    liveNote.textContent = "● live";
    try {
      await stream(`/Instructions/${id}/Stream`, (name, data) => {
        if (name !== "status") return;
        const statusChanged = data.status !== st.status || data.issue_error !== st.issue_error
          || (data.approvals || []).length !== (st.approvals || []).length;
        st = { ...st, ...data }; // the stream leaves out what does not change (payload, parameters)
        if (statusChanged) drawHead();
        drawProgress();
        const c = JSON.stringify(st.states);
        if (c !== lastCounts) { lastCounts = c; refresh(); }
      }, signal);
    } catch (e) {
      if (signal.aborted || e.name === "AbortError") return;
      progress.append(message("error", `Live updates stopped: ${e.message}`));
    }
    if (signal.aborted) return;
    liveNote.textContent = "";
    drawHead();
    drawProgress();
    drawResults();
  }
}
