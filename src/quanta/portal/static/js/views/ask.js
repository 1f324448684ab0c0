import { api, ApiError, session } from "../api.js";
import { clear, h, message } from "../dom.js";

const EXAMPLES = [
  ["Device summary", "@s = Device.GetSummary();\nSELECT DeviceName, OperatingSystem, OperatingSystemVersion, CpuCores, TotalMemoryBytes FROM @s;"],
  ["Running processes", "@p = OperatingSystem.GetProcesses();\nSELECT Name, UserName, MemoryBytes FROM @p;"],
  ["Is a process running?", "@p = OperatingSystem.GetProcesses();\nSELECT Name, COUNT(*) AS Instances FROM @p WHERE Name = %ProcessName% GROUP BY Name;"],
  ["Disks over 80% full", "@d = Device.GetDisks();\nSELECT MountPoint, PercentUsed FROM @d WHERE PercentUsed > 80;"],
];

// The draft survives navigation within the tab.
const draft = {
  payload: EXAMPLES[0][1], name: "", scope: "all", devices: "", ttl: 60, keepHours: 168, schedule: "",
  params: new Map(), // name -> {type, value}
};

const PARAM_RE = /%([A-Za-z_][A-Za-z0-9_]*)%/g;

function paramNames(text) {
  const names = [];
  for (const m of text.matchAll(PARAM_RE)) if (!names.includes(m[1])) names.push(m[1]);
  return names;
}

export async function render(main, _args, signal) {
  const s = session();
  const status = h("div", { class: "form-status", id: "ask-status" });
  const gutter = h("div", { class: "gutter", "aria-hidden": "true" });
  const editor = h("textarea", { id: "scale", class: "code", spellcheck: "false", autocapitalize: "off",
    autocomplete: "off", wrap: "off", "aria-label": "SCALE payload", value: draft.payload });
  const errorView = h("div", { id: "compile-error" });
  const paramBox = h("div", { class: "params", id: "params" });
  const nameInput = h("input", { id: "ask-name", placeholder: "adhoc", maxlength: "255", value: draft.name });
  const allRadio = h("input", { type: "radio", name: "scope", id: "scope-all", value: "all", checked: draft.scope === "all" });
  const someRadio = h("input", { type: "radio", name: "scope", id: "scope-some", value: "some", checked: draft.scope === "some" });
  const deviceList = h("datalist", { id: "device-names" });
  const devicesInput = h("input", { id: "ask-devices", list: "device-names", placeholder: "device names, comma-separated",
    value: draft.devices, disabled: draft.scope === "all" });
  const ttl = h("input", { id: "ask-ttl", type: "number", min: "1", max: "604800", value: String(draft.ttl) });
  const keep = h("input", { id: "ask-keep", type: "number", min: "1", max: "8760", value: String(draft.keepHours) });
  const schedule = h("input", { id: "ask-schedule", type: "datetime-local", value: draft.schedule });
  const submit = h("button", { class: "btn btn-primary", type: "submit", id: "ask-submit" }, "Ask");

  function lines() { return editor.value.split("\n"); }
  function drawGutter(bad) {
    clear(gutter, ...lines().map((_, i) => h("div", { class: i + 1 === bad ? "bad" : null }, String(i + 1))));
    gutter.scrollTop = editor.scrollTop;
  }
  function drawParams() {
    const names = paramNames(editor.value);
    if (!names.length) { clear(paramBox); return; }
    clear(paramBox, h("h3", {}, "Parameters"), ...names.map((n) => {
      const p = draft.params.get(n) || { type: "string", value: "" };
      draft.params.set(n, p);
      const type = h("select", { "aria-label": `${n} type`, onchange: () => { p.type = type.value; } },
        ...["string", "integer", "number", "boolean"].map((t) => h("option", { value: t, selected: p.type === t }, t)));
      const value = h("input", { id: `param-${n}`, "aria-label": n, value: p.value, oninput: () => { p.value = value.value; } });
      return h("div", { class: "param-row" }, h("label", { for: `param-${n}`, class: "mono" }, `%${n}%`), value, type);
    }));
  }
  function clearError() { clear(errorView); drawGutter(0); editor.classList.remove("has-error"); }

  function showCompileError(d) {
    const src = lines();
    const line = Math.min(Math.max(d.line || 1, 1), src.length);
    const from = Math.max(1, line - 2);
    const to = Math.min(src.length, line + 2);
    const excerpt = [];
    for (let n = from; n <= to; n++) {
      excerpt.push(h("div", { class: n === line ? "src-line offending" : "src-line" },
        h("span", { class: "ln" }, String(n)), h("span", { class: "txt" }, src[n - 1] || " ")));
      if (n === line) {
        excerpt.push(h("div", { class: "src-line caret-line" }, h("span", { class: "ln" }, ""),
          h("span", { class: "txt" }, " ".repeat(Math.max(0, (d.column || 1) - 1)) + "^")));
      }
    }
    clear(errorView, h("div", { class: "compile-error", role: "alert" },
      h("div", { class: "compile-error-head" },
        h("strong", {}, "Compile error"), " at ",
        h("span", { class: "pos", "data-line": String(line), "data-column": String(d.column || "") }, `line ${d.line}, column ${d.column}`),
        ": ", h("span", { class: "compile-message" }, d.message)),
      h("pre", { class: "excerpt" }, ...excerpt)));
    drawGutter(line);
    editor.classList.add("has-error");
    // select the offending line in the editor
    let start = 0;
    for (let i = 0; i < line - 1; i++) start += src[i].length + 1;
    editor.focus();
    editor.setSelectionRange(start + Math.max(0, (d.column || 1) - 1), start + src[line - 1].length);
  }

  function parameters() {
    const out = {};
    for (const n of paramNames(editor.value)) {
      const p = draft.params.get(n) || { type: "string", value: "" };
      if (p.type === "string") out[n] = p.value;
      else if (p.type === "boolean") {
        if (!/^(true|false)$/i.test(p.value.trim())) throw new Error(`parameter ${n}: enter true or false`);
        out[n] = /^true$/i.test(p.value.trim());
      } else {
        const v = Number(p.value);
        if (p.value.trim() === "" || !Number.isFinite(v) || (p.type === "integer" && !Number.isInteger(v))) {
          throw new Error(`parameter ${n}: enter ${p.type === "integer" ? "an integer" : "a number"}`);
        }
        out[n] = v;
      }
    }
    return out;
  }

  editor.addEventListener("input", () => { draft.payload = editor.value; drawGutter(0); drawParams(); });
  editor.addEventListener("scroll", () => { gutter.scrollTop = editor.scrollTop; });
  editor.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); form.requestSubmit(); }
  });
  for (const r of [allRadio, someRadio]) r.addEventListener("change", () => {
    draft.scope = someRadio.checked ? "some" : "all";
    devicesInput.disabled = draft.scope === "all";
    if (!devicesInput.disabled) devicesInput.focus();
  });
  devicesInput.addEventListener("input", () => { draft.devices = devicesInput.value; });
  nameInput.addEventListener("input", () => { draft.name = nameInput.value; });
  ttl.addEventListener("input", () => { draft.ttl = ttl.value; });
  keep.addEventListener("input", () => { draft.keepHours = keep.value; });
  schedule.addEventListener("input", () => { draft.schedule = schedule.value; });

  const form = h("form", { class: "ask-form", onsubmit: async (ev) => {
    ev.preventDefault();
    clear(status);
    clearError();
    let body;
    try {
      body = {
        payload: editor.value,
        name: nameInput.value.trim() || "adhoc",
        parameters: parameters(),
        devices: someRadio.checked ? devicesInput.value.split(/[\s,]+/).filter(Boolean) : null,
        instruction_ttl: Math.round(Number(ttl.value)),
        response_ttl: Math.round(Number(keep.value) * 3600),
      };
      if (someRadio.checked && !body.devices.length) throw new Error("name at least one device, or choose All devices");
      if (schedule.value) body.scheduled_at = new Date(schedule.value).getTime() / 1000;
    } catch (e) {
      clear(status, message("error", e.message));
      return;
    }
    submit.disabled = true;
    try {
      const r = await api("POST", "/Instructions", body);
      location.hash = `#/i/${r.id}`;
    } catch (e) {
      submit.disabled = false;
      if (e instanceof ApiError && e.status === 422 && e.detail && typeof e.detail === "object" && !Array.isArray(e.detail) && e.detail.line) {
        showCompileError(e.detail);
      } else {
        clear(status, message("error", e.message));
      }
    }
  } },
  h("div", { class: "editor-head" },
    h("label", { for: "scale" }, "SCALE"),
    h("div", { class: "examples" }, h("span", { class: "muted" }, "Examples:"),
      ...EXAMPLES.map(([label, text]) => h("button", { type: "button", class: "btn btn-link", onclick: () => {
        editor.value = text; draft.payload = text; clearError(); drawParams(); editor.focus();
      } }, label)))),
  h("div", { class: "editor" }, gutter, editor),
  errorView,
  paramBox,
  h("div", { class: "grid-2" },
    h("fieldset", {}, h("legend", {}, "Devices"),
      h("label", { class: "radio" }, allRadio, " All devices"),
      h("label", { class: "radio" }, someRadio, " These devices:"),
      devicesInput, deviceList),
    h("fieldset", {}, h("legend", {}, "Options"),
      h("label", { for: "ask-name" }, "Name"), nameInput,
      h("div", { class: "grid-2 tight" },
        h("div", {}, h("label", { for: "ask-ttl" }, "Gather window (seconds)"), ttl),
        h("div", {}, h("label", { for: "ask-keep" }, "Keep responses (hours)"), keep)),
      h("label", { for: "ask-schedule" }, "Run at (optional)"), schedule)),
  status,
  h("div", { class: "actions" }, submit,
    h("span", { class: "muted" }, "Ctrl+Enter to ask. Actions wait for a second person's approval.")));

  clear(main,
    h("div", { class: "page-head" }, h("h1", {}, "Ask a question"),
      s && s.role !== "Full Administrator" ? h("p", { class: "muted" }, "Raw SCALE questions are for Full Administrators; the server will refuse others.") : null),
    h("section", { class: "card" }, form));
  drawGutter(0);
  drawParams();
  try {
    const devices = await api("GET", "/Devices", undefined, { signal });
    clear(deviceList, ...devices.map((d) => h("option", { value: d.device_id }, d.online ? "online" : "offline")));
  } catch (_) { /* the list is only a convenience */ }
}
