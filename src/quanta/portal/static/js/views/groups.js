// Management groups (Full and Group Administrators): each group's rule (device names, an OS
// pattern, tags the device reports, attributes the server assigns) and its members; create, edit
// and delete rules. The Consumer API checks and audits every change; this page shows its answers.
// Members are put in groups on the Users page (PATCH /Users/{name}).
import { api } from "../api.js";
import { clear, h, message, pairsText, parsePairs } from "../dom.js";

// The rule as chips: what a device must match to be in the group (every key given).
function ruleChips(rule) {
  const chips = [];
  if (rule.devices) chips.push(h("span", { class: "chip", title: rule.devices.join(", ") },
    rule.devices.length <= 3 ? `devices: ${rule.devices.join(", ")}` : `${rule.devices.length} devices`));
  if (rule.os_like) chips.push(h("span", { class: "chip" }, `os ~ ${rule.os_like}`));
  for (const [k, v] of Object.entries(rule.tags || {})) chips.push(h("span", { class: "chip chip-tag", title: "tag (reported by the device)" }, `tag ${k}=${v}`));
  for (const [k, v] of Object.entries(rule.attributes || {})) chips.push(h("span", { class: "chip chip-attr", title: "attribute (assigned by the server)" }, `attr ${k}=${v}`));
  return chips.length ? chips : [h("span", { class: "muted" }, "every device")];
}

export async function render(main, _args, signal) {
  const status = h("div", { class: "form-status", id: "groups-status" });
  const listBody = h("div", { id: "groups-list" });
  const say = (kind, text) => clear(status, message(kind, text));

  // ---------------------------------------------------------------- the editor (create or edit)
  const fName = h("input", { id: "group-name", required: true, maxlength: "128", autocomplete: "off", placeholder: "e.g. Paris servers" });
  const fDevices = h("input", { id: "group-devices", maxlength: "8000000", placeholder: "device, device (empty: any)" });
  const fOs = h("input", { id: "group-os", maxlength: "255", placeholder: "e.g. *debian* (empty: any)" });
  const fTags = h("textarea", { id: "group-tags", rows: "3", maxlength: "20000", placeholder: "site=paris", spellcheck: "false" });
  const fAttrs = h("textarea", { id: "group-attributes", rows: "3", maxlength: "20000", placeholder: "owner=ops", spellcheck: "false" });
  const title = h("h2", { id: "group-editor-title" }, "New group");
  const cancelEdit = h("button", { type: "button", class: "btn btn-link", hidden: true, onclick: () => edit(null) }, "Cancel");
  let editing = null;

  function edit(g) {
    editing = g ? g.name : null;
    title.textContent = g ? `Edit ${g.name}` : "New group";
    fName.value = g ? g.name : "";
    fName.disabled = Boolean(g);
    fDevices.value = g && g.rule.devices ? g.rule.devices.join(", ") : "";
    fOs.value = g ? g.rule.os_like || "" : "";
    fTags.value = g ? pairsText(g.rule.tags) : "";
    fAttrs.value = g ? pairsText(g.rule.attributes) : "";
    cancelEdit.hidden = !g;
    if (g) editor.scrollIntoView({ block: "nearest" });
  }

  const editor = h("form", { class: "card", id: "group-editor", onsubmit: async (ev) => {
    ev.preventDefault();
    clear(status);
    const name = editing || fName.value.trim();
    try {
      const rule = {};
      const devices = fDevices.value.split(",").map((x) => x.trim()).filter(Boolean);
      if (devices.length) rule.devices = devices;
      if (fOs.value.trim()) rule.os_like = fOs.value.trim();
      const tags = parsePairs("Tags", fTags.value);
      if (Object.keys(tags).length) rule.tags = tags;
      const attributes = parsePairs("Attributes", fAttrs.value);
      if (Object.keys(attributes).length) rule.attributes = attributes;
      if (!name) throw new Error("give the group a name");
      await api("PUT", `/ManagementGroups/${encodeURIComponent(name)}`, rule, { signal });
      say("ok", `Saved ${name}.`);
      edit(null);
      await load();
    } catch (e) {
      if (e.name !== "AbortError") say("error", e.message || String(e));
    }
  } },
  h("div", { class: "editor-head" }, title, cancelEdit),
  h("p", { class: "muted small" }, "A device is in the group when it matches every part given. Tags are what a device reports of itself; attributes are assigned by administrators (on the device's page) and a device cannot set them."),
  h("div", { class: "grid-2 tight" },
    h("div", {}, h("label", { for: "group-name" }, "Name"), fName),
    h("div", {}, h("label", { for: "group-os" }, "Operating system like"), fOs),
    h("div", {}, h("label", { for: "group-devices" }, "Devices"), fDevices),
    h("div", {}),
    h("div", {}, h("label", { for: "group-tags" }, "Tags (one NAME=VALUE a line)"), fTags),
    h("div", {}, h("label", { for: "group-attributes" }, "Attributes (one NAME=VALUE a line)"), fAttrs)),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "btn btn-primary", id: "group-save" }, "Save rule")));

  // ---------------------------------------------------------------- the list
  async function remove(g, button) {
    if (button.dataset.armed !== "1") { // two clicks, no dialog: the second one deletes
      button.dataset.armed = "1";
      button.textContent = "Click again to delete";
      return;
    }
    clear(status);
    try {
      await api("DELETE", `/ManagementGroups/${encodeURIComponent(g.name)}`, undefined, { signal });
      say("ok", `Deleted ${g.name}.`);
      if (editing === g.name) edit(null);
      await load();
    } catch (e) {
      if (e.name !== "AbortError") say("error", e.message || String(e));
    }
  }

  async function load() {
    const groups = await api("GET", "/ManagementGroups", undefined, { signal });
    if (!groups.length) { clear(listBody, h("p", { class: "empty" }, "No management group yet: users reach every device.")); return; }
    clear(listBody, h("div", { class: "table-wrap" }, h("table", { class: "data", id: "groups-table" },
      h("thead", {}, h("tr", {}, ...["Group", "Rule", "Members", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...groups.map((g) => {
        const del = h("button", { type: "button", class: "btn btn-small btn-danger", "data-test": "delete", onclick: () => remove(g, del) }, "Delete");
        return h("tr", { dataset: { group: g.name } },
          h("td", { class: "device nowrap" }, g.name),
          h("td", { class: "rule" }, ...ruleChips(g.rule)),
          h("td", { class: "members" }, g.members.length ? g.members.join(", ") : h("span", { class: "muted" }, "none")),
          h("td", { class: "nowrap" }, h("button", { type: "button", class: "btn btn-small", "data-test": "edit", onclick: () => edit(g) }, "Edit"), " ", del));
      })))));
  }

  main.classList.add("groups-page");
  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Management groups"),
    h("p", { class: "muted" }, "Members of a group reach only the devices its rule matches (a user in no group reaches every device). Put users in groups on the Users page.")),
  status, h("section", { class: "card" }, listBody), editor);
  await load();
}
