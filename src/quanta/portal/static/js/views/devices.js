import { api } from "../api.js";
import { clear, fmtAgo, h } from "../dom.js";

export async function render(main, _args, signal) {
  const devices = await api("GET", "/Devices", undefined, { signal });
  const online = devices.filter((d) => d.online && !d.revoked).length;
  const filter = h("input", { id: "device-filter", type: "search", placeholder: "Filter by name, OS, switch or tag", "aria-label": "filter" });
  const which = h("select", { id: "device-online", "aria-label": "online" },
    h("option", { value: "" }, "All"), h("option", { value: "online" }, "Online"), h("option", { value: "offline" }, "Offline"));
  const tbody = h("tbody", {});
  const countLine = h("span", { class: "muted" });

  function draw() {
    const f = filter.value.trim().toLowerCase();
    const shown = devices.filter((d) => {
      if (which.value === "online" && !d.online) return false;
      if (which.value === "offline" && d.online) return false;
      if (!f) return true;
      const hay = [d.device_id, d.fqdn, d.os, d.switch || "", d.agent_version, ...Object.entries(d.tags).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
      return hay.includes(f);
    });
    countLine.textContent = `${shown.length} shown`;
    clear(tbody, ...shown.map((d) => h("tr", { class: "clickable", dataset: { device: d.device_id }, onclick: () => { location.hash = `#/d/${encodeURIComponent(d.device_id)}`; } },
      h("td", { class: "device" }, h("a", { href: `#/d/${encodeURIComponent(d.device_id)}` }, d.device_id),
        d.fqdn && d.fqdn !== d.device_id ? h("div", { class: "muted small" }, d.fqdn) : null),
      h("td", {}, d.revoked ? h("span", { class: "badge st-error" }, "Revoked")
        : h("span", { class: d.online ? "badge online" : "badge offline" }, d.online ? "Online" : "Offline")),
      h("td", {}, d.os || "—"), h("td", {}, d.switch || "—"),
      h("td", { class: "tags" }, ...Object.entries(d.tags).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`))),
      h("td", {}, d.agent_version || "—"), h("td", { class: "nowrap" }, d.online ? "now" : fmtAgo(d.last_seen)))));
  }
  filter.addEventListener("input", draw);
  which.addEventListener("change", draw);
  clear(main,
    h("div", { class: "page-head" }, h("h1", {}, "Devices"),
      h("div", { class: "stats" },
        h("div", { class: "stat" }, h("span", { class: "num", id: "devices-online" }, String(online)), h("span", { class: "lbl" }, "online")),
        h("div", { class: "stat" }, h("span", { class: "num", id: "devices-offline" }, String(devices.length - online)), h("span", { class: "lbl" }, "offline or revoked")),
        h("div", { class: "stat" }, h("span", { class: "num" }, String(devices.length)), h("span", { class: "lbl" }, "known")))),
    h("section", { class: "card" }, h("div", { class: "toolbar" }, filter, which, h("div", { class: "spacer" }), countLine),
      devices.length ? h("div", { class: "table-wrap" }, h("table", { class: "data", id: "devices-table" },
        h("thead", {}, h("tr", {}, ...["Device", "Status", "Operating system", "Switch", "Tags", "Agent", "Last seen"].map((c) => h("th", {}, c)))),
        tbody)) : h("p", { class: "empty" }, "No device has connected yet. Enroll one with 'quanta enroll'.")));
  draw();
}
