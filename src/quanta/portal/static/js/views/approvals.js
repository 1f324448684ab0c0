import { api, session } from "../api.js";
import { clear, fmtTime, h, keepLive, message, statusBadge } from "../dom.js";

export async function render(main, _args, signal) {
  const me = session();
  const list = h("div", { class: "approvals" });
  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Approvals"),
    h("p", { class: "muted" }, "Actions change devices, so a second person approves each one before it runs. You cannot approve your own.")),
  list);
  const pending = () => api("GET", "/Instructions?status=pending_approval&limit=100", undefined, { signal });
  const shown = new Map(); // id -> its card ({el, settle})
  const empty = h("section", { class: "card", id: "approvals-empty" }, h("p", { class: "empty" }, "Nothing is waiting for approval."));
  // who approved so far (N of M) is in each instruction's status; read them side by side
  const statuses = (items) => Promise.all(items.map((it) => api("GET", `/Instructions/${it.id}`, undefined, { signal }).catch(() => null)));
  async function update(page) {
    const fresh = page.items.filter((it) => !shown.has(it.id));
    const details = await statuses(fresh);
    fresh.forEach((it, i) => { shown.set(it.id, card(it, me, details[i])); });
    // cards of actions decided (or cancelled, expired) meanwhile, elsewhere: their new status
    const now = new Set(page.items.map((it) => it.id));
    const gone = [...shown.keys()].filter((id) => !now.has(id));
    const after = await statuses(gone.map((id) => ({ id })));
    gone.forEach((id, i) => { if (after[i]) shown.get(id).settle(after[i]); });
    const order = [...shown.keys()].sort((a, b) => b - a).map((id) => shown.get(id).el);
    if (!order.length) clear(list, empty);
    else if (order.some((el, i) => list.children[i] !== el)) clear(list, ...order);
  }
  const first = await pending();
  await update(first);
  // live: new actions appear, and decisions taken elsewhere show, without a reload (polled with backoff)
  keepLive(first.items.map((it) => it.id), async () => {
    const page = await pending();
    await update(page);
    return page.items.map((it) => it.id);
  }, () => true, signal);
}

// "1 of 2 approvals: alice" (names in the order they approved)
export function approvalProgress(required, approvers) {
  const m = required || 1;
  const names = (approvers || []).map((a) => (typeof a === "string" ? a : a.approver));
  return `${names.length} of ${m} approval${m === 1 ? "" : "s"}${names.length ? `: ${names.join(", ")}` : ""}`;
}

const AFTER = { // the badge once a decision was answered, before the page is reloaded
  created: "Approved, not issued yet", scheduled: "Scheduled", active: "In progress", finished: "Finished",
  rejected: "Rejected", cancelled: "Cancelled", expired: "Never issued", approval_expired: "Approval expired",
};

// An action's card: {el, settle(status)}; settle shows a decision taken elsewhere (another
// approver, a cancel, the approval window ending) once it is no longer pending.
function card(it, me, st) {
  const out = h("div", { class: "decision-status" });
  let decided = false;
  const badge = h("span", { class: "approval-badge" }, statusBadge(it.status));
  const progress = h("p", { class: "approval-progress", "data-test": "approval-progress" },
    st ? approvalProgress(st.approvers_required, st.approvals) : "");
  const setBadge = (status, label) => clear(badge, label
    ? h("span", { class: `badge status-${status.replace(/[^a-z0-9_-]/g, "")}` }, label) : statusBadge(status));
  const reason = h("input", { id: `reason-${it.id}`, class: "reason", placeholder: "reason (recorded in the audit log)", maxlength: "2000" });
  const code = h("input", { id: `code-${it.id}`, class: "code-input", placeholder: "one-time code", maxlength: "16", inputmode: "numeric", autocomplete: "one-time-code" });
  const buttons = [];
  const decide = (verb) => async () => {
    for (const b of buttons) b.disabled = true;
    clear(out);
    try {
      const body = { reason: reason.value || null };
      if (verb === "Approve" && code.value.trim()) body.code = code.value.trim();
      const r = await api("POST", `/Instructions/${it.id}/${verb}`, body);
      const view = h("a", { href: `#/i/${it.id}` }, "View instruction");
      if (verb !== "Approve") {
        setBadge(r.status, AFTER[r.status]);
        clear(out, message("ok", "Rejected. ", view));
      } else if (r.status === "pending_approval") { // counted; more approvers are needed
        progress.textContent = approvalProgress(r.approvers_required, r.approvers);
        const more = (r.approvers_required || 1) - (r.approvers || []).length;
        clear(out, message("ok", `Approved: your approval counted; ${more} more needed from other people. `, view));
      } else if (r.status === "created" && r.issued === false) { // approved; the Core cannot take it yet
        progress.textContent = approvalProgress(r.approvers_required, r.approvers);
        setBadge("created", AFTER.created);
        clear(out, message("info", `Approved, not issued yet: ${r.message || "the Core is unavailable"}. `, view));
      } else {
        if (r.approvers) progress.textContent = approvalProgress(r.approvers_required, r.approvers);
        setBadge(r.status, AFTER[r.status]);
        clear(out, message("ok", `Approved: ${AFTER[r.status] || r.status}${r.targeted !== undefined ? `, sent to ${r.targeted} device(s)` : ""}. `, view));
      }
      decided = true;
      form.remove();
      window.dispatchEvent(new CustomEvent("quanta:approvals-changed"));
    } catch (e) {
      clear(out, message("error", e.message));
      for (const b of buttons) b.disabled = false;
    }
  };
  const approve = h("button", { type: "button", class: "btn btn-primary", "data-test": "approve", onclick: decide("Approve") }, "Approve");
  const reject = h("button", { type: "button", class: "btn btn-danger", "data-test": "reject", onclick: decide("Reject") }, "Reject");
  const sendCode = h("button", { type: "button", class: "btn btn-link", onclick: async () => {
    clear(out);
    try {
      const r = await api("POST", `/Instructions/${it.id}/ApprovalCode`, {});
      clear(out, message("ok", `A one-time code was emailed to ${r.sent_to}.`));
      code.focus();
    } catch (e) { clear(out, message("error", e.message)); }
  } }, "Email me a one-time code");
  buttons.push(approve, reject);
  const form = h("div", { class: "decision" }, reason, code, approve, reject, sendCode);
  const mine = st && me && (st.approvals || []).some((a) => a.approver === me.username);
  if (mine) { // approved already: another person must; the buttons would only be refused
    form.hidden = true;
    out.append(message("info", "You approved this action; it waits for other approvers."));
  }
  const settle = (now) => {
    if (decided || now.status === "pending_approval") return;
    decided = true;
    setBadge(now.status, AFTER[now.status]);
    form.remove();
    clear(out, message("info", `${AFTER[now.status] || now.status}${now.decided_by ? ` by ${now.decided_by}` : ""}. `,
      h("a", { href: `#/i/${it.id}` }, "View instruction")));
  };
  const el = h("section", { class: "card approval", id: `approval-${it.id}`, "data-id": String(it.id) },
    h("div", { class: "approval-head" },
      h("h2", {}, `#${it.id} `, h("span", { class: "title-name" }, it.name)), badge),
    progress,
    h("p", { class: "muted" }, `Requested by ${it.created_by} on ${fmtTime(it.created_at)} for `,
      it.devices ? `${it.devices.length} device(s): ${it.devices.join(", ")}` : "every device",
      it.approval_expires_at ? ` · expires unapproved ${fmtTime(it.approval_expires_at)}` : ""),
    me && me.username === it.created_by ? message("info", "You requested this action: a second person must approve it.") : null,
    h("pre", { class: "code-block" }, it.payload),
    Object.keys(it.parameters || {}).length ? h("p", { class: "muted" }, `Parameters: ${JSON.stringify(it.parameters)}`) : null,
    form, out);
  return { el, settle };
}
