import { api, session } from "../api.js";
import { clear, fmtTime, h, message, statusBadge } from "../dom.js";

export async function render(main, _args, signal) {
  const me = session();
  const list = h("div", { class: "approvals" });
  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Approvals"),
    h("p", { class: "muted" }, "Actions change devices, so a second person approves each one before it runs. You cannot approve your own.")),
  list);
  const page = await api("GET", "/Instructions?status=pending_approval&limit=100", undefined, { signal });
  if (!page.items.length) { clear(list, h("section", { class: "card" }, h("p", { class: "empty" }, "Nothing is waiting for approval."))); return; }
  clear(list, ...page.items.map((it) => card(it, me)));
}

function card(it, me) {
  const out = h("div", { class: "decision-status" });
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
      clear(out, message("ok", verb === "Approve" ? `Approved: ${r.status}${r.targeted !== undefined ? `, sent to ${r.targeted} device(s)` : ""}. ` : "Rejected. ",
        h("a", { href: `#/i/${it.id}` }, "View instruction")));
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
  return h("section", { class: "card approval", id: `approval-${it.id}`, "data-id": String(it.id) },
    h("div", { class: "approval-head" },
      h("h2", {}, `#${it.id} `, h("span", { class: "title-name" }, it.name)), statusBadge(it.status)),
    h("p", { class: "muted" }, `Requested by ${it.created_by} on ${fmtTime(it.created_at)} for `,
      it.devices ? `${it.devices.length} device(s): ${it.devices.join(", ")}` : "every device",
      it.approval_expires_at ? ` · expires unapproved ${fmtTime(it.approval_expires_at)}` : ""),
    me && me.username === it.created_by ? message("info", "You requested this action: a second person must approve it.") : null,
    h("pre", { class: "code-block" }, it.payload),
    Object.keys(it.parameters || {}).length ? h("p", { class: "muted" }, `Parameters: ${JSON.stringify(it.parameters)}`) : null,
    form, out);
}
