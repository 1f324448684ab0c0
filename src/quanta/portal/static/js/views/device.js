// One device (#/d/<name>): what it reports (name, address, OS, agent, tags), what the server
// assigns (attributes; Full Administrators edit them here), its management groups, online state
// and its recent instructions with its own state in each, kept live while one of them runs.
import { api, session } from "../api.js";
import { clear, fmtAgo, fmtTime, h, keepLive, kindBadge, message, pairsText, parsePairs, stateBadge, statusBadge } from "../dom.js";

const chips = (m, cls) => {
  const e = Object.entries(m || {});
  return e.length ? e.map(([k, v]) => h("span", { class: `chip ${cls}` }, `${k}=${v}`)) : [h("span", { class: "muted" }, "none")];
};

export async function render(main, args, signal) {
  const name = args[0] || "";
  if (!name) throw new Error("no such device");
  const path = `/Devices/${encodeURIComponent(name)}`;
  let d = await api("GET", path, undefined, { signal });
  const admin = (session() || {}).role === "Full Administrator";
  const head = h("div", { class: "page-head" });
  const facts = h("section", { class: "card", id: "device-facts" });
  const recent = h("section", { class: "card", id: "device-instructions" });
  const status = h("div", { class: "form-status", id: "device-status" });

  function drawHead() {
    clear(head, h("h1", { class: "nowrap-title" }, d.device_id),
      h("div", { class: "meta" }, h("span", { id: "device-online" }, d.revoked ? h("span", { class: "badge st-error" }, "Revoked")
        : h("span", { class: d.online ? "badge online" : "badge offline" }, d.online ? "Online" : "Offline")),
      h("span", { class: "muted" }, d.online ? ` on ${d.switch || "a Switch"}` : ` · last seen ${fmtAgo(d.last_seen)}`)),
      h("p", {}, h("a", { href: "#/devices" }, "‹ All devices")));
  }

  function drawFacts() {
    const row = (label, ...value) => [h("dt", {}, label), h("dd", {}, ...value)];
    clear(facts, h("h2", {}, "Device"),
      h("dl", { class: "facts" },
        row("Name", h("span", { class: "mono", id: "device-name" }, d.device_id)),
        row("FQDN", d.fqdn || "—"),
        row("IP address", h("span", { class: "mono", id: "device-address" }, d.address || "—")),
        row("Operating system", d.os || "—"),
        row("Agent", d.agent_version || "—"),
        row("Switch", d.switch || "—"),
        row("Last seen", d.online ? "now" : `${fmtTime(d.last_seen)} (${fmtAgo(d.last_seen)})`),
        row("First seen", fmtTime(d.first_seen)),
        d.source ? row("Imported by", d.source) : null,
        row("Tags", h("span", { id: "device-tags" }, ...chips(d.tags, "chip-tag"))),
        row("Attributes", h("span", { id: "device-attributes" }, ...chips(d.attributes, "chip-attr"))),
        row("Management groups", h("span", { id: "device-groups" },
          ...(d.groups.length ? d.groups.map((g) => h("span", { class: "chip" }, g)) : [h("span", { class: "muted" }, "none")])))),
      admin ? attributesEditor() : null);
  }

  // Full Administrators: set or remove server-assigned attributes (management groups match them).
  function attributesEditor() {
    const box = h("textarea", { id: "attributes-edit", rows: "3", maxlength: "20000", spellcheck: "false", "aria-label": "attributes" }, "");
    box.value = pairsText(d.attributes);
    return h("form", { class: "attr-form", onsubmit: async (ev) => {
      ev.preventDefault();
      clear(status);
      try {
        const want = parsePairs("Attributes", box.value);
        const changes = { ...want };
        for (const k of Object.keys(d.attributes)) if (!(k in want)) changes[k] = null;
        await api("PUT", `${path}/Attributes`, changes, { signal });
        d = await api("GET", path, undefined, { signal });
        drawFacts();
        clear(status, message("ok", "Attributes saved."));
      } catch (e) {
        if (e.name !== "AbortError") clear(status, message("error", e.message || String(e)));
      }
    } }, h("label", { for: "attributes-edit" }, "Server-assigned attributes (one NAME=VALUE a line)"), box,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "btn btn-small", id: "attributes-save" }, "Save attributes")));
  }

  function drawRecent() {
    clear(recent, h("h2", {}, "Recent instructions"),
      d.instructions.length ? h("div", { class: "table-wrap" }, h("table", { class: "data", id: "device-instructions-table" },
        h("thead", {}, h("tr", {}, ...["#", "Name", "Kind", "Status", "This device", "Requested by", "Created", "Updated"].map((c) => h("th", {}, c)))),
        h("tbody", {}, ...d.instructions.map((i) => h("tr", { class: "clickable", dataset: { id: String(i.id) }, onclick: () => { location.hash = `#/i/${i.id}`; } },
          h("td", { class: "id" }, h("a", { href: `#/i/${i.id}` }, String(i.id))), h("td", { class: "name" }, i.name),
          h("td", {}, kindBadge(i.kind)), h("td", { class: "status" }, statusBadge(i.status)),
          h("td", { class: "state" }, stateBadge(i.state), i.error ? h("div", { class: "err small" }, i.error.slice(0, 200)) : null),
          h("td", {}, i.created_by), h("td", { class: "nowrap" }, fmtTime(i.created_at)), h("td", { class: "nowrap" }, fmtTime(i.updated_at)))))))
        : h("p", { class: "empty" }, "No instruction has targeted this device yet."));
  }

  main.classList.add("device-page");
  clear(main, head, status, facts, recent);
  drawHead();
  drawFacts();
  drawRecent();
  // live: the online state, and the status of its instructions and its state in each (polled with
  // backoff: every 2 s while something changes, up to every 30 s while nothing does)
  keepLive(d, async () => {
    const next = await api("GET", path, undefined, { signal });
    const changed = JSON.stringify(next) !== JSON.stringify(d);
    d = next;
    if (changed) { drawHead(); drawRecent(); }
    return next;
  }, () => true, signal);
}
