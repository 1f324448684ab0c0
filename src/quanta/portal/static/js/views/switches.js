import { api } from "../api.js";
import { clear, h } from "../dom.js";

export async function render(main, _args, signal) {
  const switches = await api("GET", "/Switches", undefined, { signal });
  clear(main, h("div", { class: "page-head" }, h("h1", {}, "Switches"),
    h("p", { class: "muted" }, "Rows of SwitchConfiguration. Agents connect to the client port (WSS); the Core pokes the port after it.")),
  h("section", { class: "card" }, switches.length ? h("div", { class: "table-wrap" }, h("table", { class: "data", id: "switches-table" },
    h("thead", {}, h("tr", {}, ...["Name", "Host", "Client port", "Poke port", "Enabled", "Online devices", "Devices"].map((c) => h("th", {}, c)))),
    h("tbody", {}, ...switches.map((s) => h("tr", {},
      h("td", { class: "device" }, s.name), h("td", {}, s.host), h("td", { class: "num" }, String(s.port)),
      h("td", { class: "num" }, String(s.poke_port)),
      h("td", {}, h("span", { class: s.enabled ? "badge online" : "badge offline" }, s.enabled ? "Enabled" : "Disabled")),
      h("td", { class: "num" }, String(s.online_devices)), h("td", { class: "num" }, String(s.devices)))))))
    : h("p", { class: "empty" }, "No Switch is configured.")));
}
