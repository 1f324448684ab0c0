// Users (Full Administrators): list, create, disable/enable, role, management groups, roles per
// instruction set, password reset, and the login locks with unlock. Every change is made by the
// Consumer API, which audits it; this page only shows what the API answers.
import { api, session } from "../api.js";
import { clear, fmtTime, h, message } from "../dom.js";

const ROLES = ["Full Administrator", "Questioner", "Actioner", "Approver", "Viewer", "Group Administrator"];

function roleSelect(id, value) {
  return h("select", { id, "aria-label": "role" }, ...ROLES.map((r) => h("option", { value: r, selected: r === value }, r)));
}

// "Actioner@Processes, Viewer@*" <-> [{role, instruction_set}]
function parseAssignments(text) {
  return text.split(",").map((x) => x.trim()).filter(Boolean).map((x) => {
    const at = x.lastIndexOf("@");
    if (at <= 0 || at === x.length - 1) throw new Error(`"${x}": write ROLE@INSTRUCTION_SET (or ROLE@* for every set)`);
    return { role: x.slice(0, at).trim(), instruction_set: x.slice(at + 1).trim() };
  });
}

function names(text) {
  return text.split(",").map((x) => x.trim()).filter(Boolean);
}

export async function render(main, _args, signal) {
  const me = session();
  const status = h("div", { class: "form-status", id: "users-status" });
  const usersBody = h("div", { id: "users-list" });
  const locksBody = h("div", { id: "locks-list" });
  const groupsInfo = h("p", { class: "muted small", id: "groups-info" });

  function say(kind, text) { clear(status, message(kind, text)); }

  async function act(what, fn) {
    clear(status);
    try {
      await fn();
      say("ok", what);
      await load();
    } catch (e) {
      if (e.name === "AbortError") return;
      say("error", e.message || String(e));
    }
  }

  // ---------------------------------------------------------------- create
  const nName = h("input", { id: "new-username", autocomplete: "off", required: true, maxlength: "128" });
  const nPass = h("input", { id: "new-password", type: "password", autocomplete: "new-password", required: true, maxlength: "1024" });
  const nRole = roleSelect("new-role", "Viewer");
  const nEmail = h("input", { id: "new-email", type: "email", maxlength: "254" });
  const nGroups = h("input", { id: "new-groups", placeholder: "group, group", maxlength: "4000" });
  const nAssign = h("input", { id: "new-assignments", placeholder: "Actioner@Processes", maxlength: "4000" });
  const create = h("form", { class: "card", id: "user-create", onsubmit: (ev) => {
    ev.preventDefault();
    act(`Created ${nName.value}.`, async () => {
      const body = { username: nName.value, password: nPass.value, role: nRole.value,
        groups: names(nGroups.value), assignments: parseAssignments(nAssign.value) };
      if (nEmail.value) body.email = nEmail.value;
      await api("POST", "/Users", body, { signal });
      for (const el of [nName, nPass, nEmail, nGroups, nAssign]) el.value = "";
    });
  } },
  h("h2", {}, "New user"),
  h("div", { class: "grid-2 tight" },
    h("div", {}, h("label", { for: "new-username" }, "User name"), nName),
    h("div", {}, h("label", { for: "new-password" }, "Password"), nPass),
    h("div", {}, h("label", { for: "new-role" }, "Role"), nRole),
    h("div", {}, h("label", { for: "new-email" }, "E-mail"), nEmail),
    h("div", {}, h("label", { for: "new-groups" }, "Management groups"), nGroups),
    h("div", {}, h("label", { for: "new-assignments" }, "Roles per instruction set"), nAssign)),
  h("div", { class: "actions" }, h("button", { class: "btn btn-primary", type: "submit", id: "user-create-submit" }, "Create user")));

  // ---------------------------------------------------------------- one user's row
  function row(u) {
    const self = me && u.username === me.username;
    const role = roleSelect(`role-${u.username}`, u.role);
    const groups = h("input", { class: "user-groups", value: u.groups.join(", "), "aria-label": "management groups", maxlength: "4000" });
    const assigns = h("input", { class: "user-assignments", value: u.assignments.map((a) => `${a.role}@${a.instruction_set}`).join(", "),
      "aria-label": "roles per instruction set", maxlength: "4000" });
    const save = h("button", { class: "btn btn-small", type: "button", dataset: { test: "save" }, onclick: () =>
      act(`Saved ${u.username}.`, () => api("PATCH", `/Users/${encodeURIComponent(u.username)}`,
        { role: role.value, groups: names(groups.value), assignments: parseAssignments(assigns.value) }, { signal })) }, "Save");
    const toggle = h("button", { class: u.disabled ? "btn btn-small" : "btn btn-small btn-danger", type: "button",
      dataset: { test: u.disabled ? "enable" : "disable" }, disabled: self, onclick: () =>
        act(`${u.disabled ? "Enabled" : "Disabled"} ${u.username}.`, () =>
          api("PATCH", `/Users/${encodeURIComponent(u.username)}`, { disabled: !u.disabled }, { signal })) },
    u.disabled ? "Enable" : "Disable");
    const pw = h("input", { class: "user-reset", type: "password", autocomplete: "new-password", placeholder: "new password",
      "aria-label": "new password", maxlength: "1024" });
    const reset = h("button", { class: "btn btn-small", type: "button", dataset: { test: "reset" }, onclick: () => {
      if (!pw.value) { say("error", `Type a new password for ${u.username} first.`); return; }
      act(`Reset the password of ${u.username}; their sessions ended.`, async () => {
        await api("POST", `/Users/${encodeURIComponent(u.username)}/Password`, { password: pw.value }, { signal });
        pw.value = "";
      });
    } }, "Reset password");
    const del = h("button", { class: "btn btn-small btn-danger", type: "button", dataset: { test: "delete" }, disabled: self,
      onclick: (ev) => {
        const b = ev.currentTarget;
        if (b.dataset.armed !== "1") { b.dataset.armed = "1"; b.textContent = "Really delete?"; return; }
        act(`Deleted ${u.username}.`, () => api("DELETE", `/Users/${encodeURIComponent(u.username)}`, undefined, { signal }));
      } }, "Delete");
    return h("tr", { dataset: { user: u.username }, class: u.disabled ? "user-disabled" : null },
      h("td", { class: "device" }, u.username, self ? h("span", { class: "muted small" }, " (you)") : null,
        u.email ? h("div", { class: "muted small" }, u.email) : null),
      h("td", {}, u.disabled ? h("span", { class: "badge st-error", dataset: { test: "state" } }, "Disabled")
        : u.locked_until ? h("span", { class: "badge st-pending", dataset: { test: "state" } }, "Locked")
          : h("span", { class: "badge online", dataset: { test: "state" } }, "Enabled")),
      h("td", {}, role), h("td", {}, groups), h("td", {}, assigns),
      h("td", { class: "num" }, String(u.sessions)), h("td", { class: "nowrap" }, fmtTime(u.password_changed_at)),
      h("td", { class: "user-actions" }, save, toggle, h("span", { class: "user-reset-box" }, pw, reset), del));
  }

  function lockRow(l) {
    return h("tr", { dataset: { lock: `${l.kind}:${l.subject}` } },
      h("td", {}, l.kind === "user" ? "User name" : "Address"), h("td", { class: "device" }, l.subject),
      h("td", { class: "num" }, String(l.failures)), h("td", { class: "nowrap" }, fmtTime(l.locked_at)),
      h("td", { class: "nowrap" }, fmtTime(l.locked_until)),
      h("td", {}, h("button", { class: "btn btn-small", type: "button", dataset: { test: "unlock" }, onclick: () =>
        act(`Unlocked ${l.subject}.`, () => api("DELETE", `/Locks/${encodeURIComponent(l.kind)}/${encodeURIComponent(l.subject)}`,
          undefined, { signal })) }, "Unlock")));
  }

  async function load() {
    const [list, locks, groups] = await Promise.all([api("GET", "/Users", undefined, { signal }),
      api("GET", "/Locks", undefined, { signal }), api("GET", "/ManagementGroups", undefined, { signal })]);
    clear(usersBody, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "users-table" },
      h("thead", {}, h("tr", {}, ...["User", "State", "Role", "Management groups", "Roles per instruction set", "Sessions",
        "Password set", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...list.map(row)))));
    clear(locksBody, locks.length ? h("div", { class: "table-wrap" }, h("table", { class: "data", id: "locks-table" },
      h("thead", {}, h("tr", {}, ...["Kind", "Subject", "Failures", "Locked at", "Until", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...locks.map(lockRow)))) : h("p", { class: "empty", id: "no-locks" }, "No sign-in is locked."));
    groupsInfo.textContent = groups.length
      ? `Management groups: ${groups.map((g) => g.name).join(", ")}. A user in no group reaches every device.`
      : "No management group is defined: every user reaches every device.";
  }

  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Users"),
    h("p", { class: "muted" }, "Who may sign in, with which role, on which devices. Disabling a user or resetting a password ends their sessions at once.")),
  status, create,
  h("section", { class: "card" }, h("h2", {}, "Users"), groupsInfo, usersBody),
  h("section", { class: "card" }, h("h2", {}, "Locked sign-ins"),
    h("p", { class: "muted small" }, "After repeated wrong passwords a user name or an address is locked for a while; unlocking forgets its failures."),
    locksBody));
  await load();
}
