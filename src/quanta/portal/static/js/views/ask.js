import { api, ApiError, session } from "../api.js";
import { clear, h, kindBadge, message } from "../dom.js";
import { scaleEditor } from "./editor.js";

const ADMIN = "Full Administrator";

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
  mode: "", // "definition" or "raw" (raw SCALE: Full Administrators only)
  def: "", // chosen definition name
  defValues: new Map(), // definition name -> {param: input value}
  defTtl: new Map(), // definition name -> {ttl, keepHours}
};

const PARAM_RE = /%([A-Za-z_][A-Za-z0-9_]*)%/g;

function paramNames(text) {
  const names = [];
  for (const m of text.matchAll(PARAM_RE)) if (!names.includes(m[1])) names.push(m[1]);
  return names;
}

export async function render(main, _args, signal, query = new URLSearchParams()) {
  const s = session();
  const isAdmin = Boolean(s && s.role === ADMIN);
  let defs = [];
  let defsError = "";
  try {
    defs = await api("GET", "/InstructionDefinitions", undefined, { signal });
  } catch (e) {
    if (signal.aborted || e.name === "AbortError") throw e;
    defsError = e.message;
  }
  if (query.get("definition") && defs.some((d) => d.name === query.get("definition"))) {
    draft.def = query.get("definition");
    draft.mode = "definition";
  }
  if (!isAdmin || !draft.mode) draft.mode = isAdmin ? "raw" : "definition";
  const defForm = definitionForm(defs, defsError);
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

  const rawPanel = h("div", { id: "raw-panel", hidden: draft.mode !== "raw" },
    h("div", { class: "editor-head" },
      h("label", { for: "scale" }, "SCALE"),
      h("div", { class: "examples" }, h("span", { class: "muted" }, "Examples:"),
        ...EXAMPLES.map(([label, text]) => h("button", { type: "button", class: "btn btn-link", onclick: () => {
          editor.value = text; clearError(); editor.focus();
          editor.dispatchEvent(new Event("input")); // the draft, parameters, highlighting and check follow
        } }, label)))),
    scaleEditor(editor, gutter, signal),
    errorView,
    paramBox);
  const rawOptions = h("div", { hidden: draft.mode !== "raw" },
    h("label", { for: "ask-name" }, "Name"), nameInput,
    h("div", { class: "grid-2 tight" },
      h("div", {}, h("label", { for: "ask-ttl" }, "Gather window (seconds)"), ttl),
      h("div", {}, h("label", { for: "ask-keep" }, "Keep responses (hours)"), keep)));
  const tabs = isAdmin ? h("div", { class: "tabs ask-modes", role: "tablist" },
    h("button", { type: "button", role: "tab", id: "mode-definition", class: draft.mode === "definition" ? "tab active" : "tab",
      onclick: () => setMode("definition") }, "Instruction definition"),
    h("button", { type: "button", role: "tab", id: "mode-raw", class: draft.mode === "raw" ? "tab active" : "tab",
      onclick: () => setMode("raw") }, "Raw SCALE")) : null;
  function setMode(mode) {
    draft.mode = mode;
    clear(status);
    rawPanel.hidden = rawOptions.hidden = mode !== "raw";
    defForm.panel.hidden = defForm.options.hidden = mode !== "definition";
    if (tabs) for (const t of tabs.children) t.classList.toggle("active", t.id === `mode-${mode}`);
    submit.textContent = mode === "raw" ? "Ask" : defForm.verb();
  }
  defForm.onChange = () => { if (draft.mode === "definition") submit.textContent = defForm.verb(); };

  function scopeDevices() {
    if (!someRadio.checked) return null;
    const list = devicesInput.value.split(/[\s,]+/).filter(Boolean);
    if (!list.length) throw new Error("name at least one device, or choose All devices");
    return list;
  }

  const form = h("form", { class: "ask-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    clear(status);
    clearError();
    let body;
    try {
      if (draft.mode === "raw") {
        body = {
          payload: editor.value,
          name: nameInput.value.trim() || "adhoc",
          parameters: parameters(),
          devices: scopeDevices(),
          instruction_ttl: Math.round(Number(ttl.value)),
          response_ttl: Math.round(Number(keep.value) * 3600),
        };
      } else {
        body = defForm.body();
        body.devices = scopeDevices();
      }
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
      if (draft.mode === "raw" && e instanceof ApiError && e.status === 422 && e.detail && typeof e.detail === "object" && !Array.isArray(e.detail) && e.detail.line) {
        showCompileError(e.detail);
      } else {
        // the server's refusal as it came (no rights for the set, a wrong parameter, ...)
        const m = message("error", e.message);
        if (e instanceof ApiError) m.dataset.status = String(e.status);
        clear(status, m);
      }
    }
  } },
  tabs,
  defForm.panel,
  rawPanel,
  h("div", { class: "grid-2" },
    h("fieldset", {}, h("legend", {}, "Devices"),
      h("label", { class: "radio" }, allRadio, " All devices"),
      h("label", { class: "radio" }, someRadio, " These devices:"),
      devicesInput, deviceList),
    h("fieldset", {}, h("legend", {}, "Options"),
      rawOptions, defForm.options,
      h("label", { for: "ask-schedule" }, "Run at (optional)"), schedule)),
  status,
  h("div", { class: "actions" }, submit,
    h("span", { class: "muted" }, "Ctrl+Enter to ask. Actions wait for a second person's approval.")));
  setMode(draft.mode);

  clear(main,
    h("div", { class: "page-head" }, h("h1", {}, "Ask a question"),
      isAdmin ? null : h("p", { class: "muted", id: "ask-note" },
        "Ask through the instruction definitions your roles allow; raw SCALE is for Full Administrators.")),
    h("section", { class: "card" }, form));
  drawGutter(0);
  drawParams();
  try {
    const devices = await api("GET", "/Devices", undefined, { signal });
    clear(deviceList, ...devices.map((d) => h("option", { value: d.device_id }, d.online ? "online" : "offline")));
  } catch (_) { /* the list is only a convenience */ }
}

// ------------------------------------------------------------------ instruction definitions
// A picker grouped by instruction set, a typed field per declared parameter, the readable
// description with the current values filled in, and TTL fields bounded by the definition.
// The server checks everything again; its refusals are shown as they come.
function definitionForm(defs, defsError) {
  const byName = new Map(defs.map((d) => [d.name, d]));
  if (!byName.has(draft.def)) draft.def = defs.length ? defs[0].name : "";
  const sets = [...new Set(defs.map((d) => d.instruction_set))].sort();
  const select = h("select", { id: "def-select", "aria-label": "instruction definition", onchange: () => { draft.def = select.value; draw(); } },
    ...sets.map((set) => h("optgroup", { label: set },
      ...defs.filter((d) => d.instruction_set === set).map((d) =>
        h("option", { value: d.name, selected: d.name === draft.def }, d.type === "action" ? `${d.name} (action)` : d.name)))));
  const info = h("div", { class: "def-info", id: "def-info" });
  const readable = h("p", { class: "def-readable", id: "def-readable" });
  const fields = h("div", { class: "params def-params", id: "def-params" });
  const ttl = h("input", { id: "def-ttl", type: "number", step: "1" });
  const keep = h("input", { id: "def-keep", type: "number", step: "any" });
  const ttlHint = h("span", { class: "muted small", id: "def-ttl-bounds" });
  const keepHint = h("span", { class: "muted small", id: "def-keep-bounds" });
  const self = { onChange: () => {} };

  const panel = h("div", { id: "def-panel", hidden: draft.mode !== "definition" },
    defs.length
      ? h("div", {}, h("label", { for: "def-select" }, "Instruction definition"), select, info, readable, fields)
      : message("info", defsError ? `Instruction definitions could not be loaded: ${defsError}`
        : "No instruction definitions are available to you. An administrator imports them as signed packs."));
  const options = h("div", { hidden: draft.mode !== "definition" },
    h("div", { class: "grid-2 tight" },
      h("div", {}, h("label", { for: "def-ttl" }, "Gather window (seconds)"), ttl, ttlHint),
      h("div", {}, h("label", { for: "def-keep" }, "Keep responses (hours)"), keep, keepHint)));

  function current() { return byName.get(draft.def) || null; }
  function values(d) {
    if (!draft.defValues.has(d.name)) {
      const v = {};
      for (const p of d.parameters) {
        if (p.type === "boolean") v[p.name] = p.default === true;
        else if (p.allowed) v[p.name] = p.default === null || p.default === undefined ? "" : String(p.allowed.indexOf(p.default));
        else v[p.name] = p.default === null || p.default === undefined ? "" : String(p.default);
      }
      draft.defValues.set(d.name, v);
    }
    return draft.defValues.get(d.name);
  }
  function ttls(d) {
    if (!draft.defTtl.has(d.name)) draft.defTtl.set(d.name, { ttl: String(d.ttl.instruction_default), keepHours: String(d.ttl.response_default / 3600) });
    return draft.defTtl.get(d.name);
  }
  function shown(p, v) { // a value as the readable text shows it
    if (p.type === "boolean") return v ? "true" : "false";
    if (p.allowed) return v === "" ? "…" : String(p.allowed[Number(v)]);
    return v === "" ? "…" : v;
  }
  function drawReadable(d) {
    const v = values(d);
    const byParam = new Map(d.parameters.map((p) => [p.name, p]));
    clear(readable, ...d.description.split(/(%[A-Za-z_][A-Za-z0-9_]*%)/).map((part) => {
      const p = byParam.get(part.slice(1, -1));
      return part.length > 2 && part.startsWith("%") && part.endsWith("%") && p
        ? h("span", { class: "pv", "data-param": p.name }, shown(p, v[p.name])) : part;
    }));
  }
  function hint(p) {
    const bits = [p.type === "float" ? "number" : p.type];
    if (p.required) bits.push("required");
    if (p.min !== null && p.min !== undefined) bits.push(`min ${p.min}`);
    if (p.max !== null && p.max !== undefined) bits.push(`max ${p.max}`);
    if (p.max_length) bits.push(`at most ${p.max_length} characters`);
    if (p.pattern) bits.push(`must match ${p.pattern}`);
    return bits.join(" · ") + (p.description ? ` — ${p.description}` : "");
  }
  function field(d, p) {
    const v = values(d);
    const id = `dparam-${p.name}`;
    const changed = (val) => { v[p.name] = val; drawReadable(d); };
    let input;
    if (p.type === "boolean") {
      input = h("input", { id, type: "checkbox", checked: v[p.name], onchange: () => changed(input.checked) });
    } else if (p.allowed) {
      input = h("select", { id, onchange: () => changed(input.value) },
        v[p.name] === "" ? h("option", { value: "", selected: true }, "— choose —") : null,
        ...p.allowed.map((a, i) => h("option", { value: String(i), selected: v[p.name] === String(i) }, String(a))));
    } else if (p.type === "integer" || p.type === "float") {
      input = h("input", { id, type: "number", step: p.type === "integer" ? "1" : "any", min: p.min ?? null, max: p.max ?? null,
        value: v[p.name], oninput: () => changed(input.value) });
    } else {
      input = h("input", { id, type: "text", value: v[p.name], maxlength: p.max_length ?? null,
        placeholder: p.pattern ? `matches ${p.pattern}` : null, spellcheck: "false", oninput: () => changed(input.value) });
    }
    return h("div", { class: "param-row def-param" },
      h("label", { for: id, class: "mono" }, p.name, p.required ? h("span", { class: "req", title: "required" }, " *") : null),
      input, h("span", { class: "muted small param-hint" }, hint(p)));
  }
  function draw() {
    const d = current();
    if (!d) return;
    const t = ttls(d);
    clear(info, kindBadge(d.type), " ", h("span", { class: "chip", id: "def-set" }, `set: ${d.instruction_set}`),
      d.aggregation ? h("span", { class: "muted small" }, ` · aggregated by ${d.aggregation.group_by.join(", ")}`) : null,
      d.pack ? h("span", { class: "muted small" }, ` · pack ${d.pack}${d.publisher ? ` by ${d.publisher}` : ""}`) : null);
    drawReadable(d);
    clear(fields, d.parameters.length ? h("h3", {}, "Parameters") : null, ...d.parameters.map((p) => field(d, p)));
    Object.assign(ttl, { min: String(d.ttl.instruction_min), max: String(d.ttl.instruction_max), value: t.ttl });
    Object.assign(keep, { min: String(d.ttl.response_min / 3600), max: String(d.ttl.response_max / 3600), value: t.keepHours });
    ttlHint.textContent = `${d.ttl.instruction_min}–${d.ttl.instruction_max} s`;
    keepHint.textContent = `${fmtHours(d.ttl.response_min)}–${fmtHours(d.ttl.response_max)} h`;
    ttl.oninput = () => { t.ttl = ttl.value; };
    keep.oninput = () => { t.keepHours = keep.value; };
    self.onChange();
  }

  self.panel = panel;
  self.options = options;
  self.verb = () => (current() && current().type === "action" ? "Request action" : "Ask");
  self.body = () => {
    const d = current();
    if (!d) throw new Error("choose an instruction definition");
    const v = values(d);
    const parameters = {};
    for (const p of d.parameters) {
      const x = v[p.name];
      if (p.type === "boolean") parameters[p.name] = Boolean(x);
      else if (p.allowed) { if (x !== "") parameters[p.name] = p.allowed[Number(x)]; }
      else if (p.type === "integer" || p.type === "float") {
        if (String(x).trim() === "") continue; // the server applies the default, or says it is required
        const n = Number(x);
        if (!Number.isFinite(n)) throw new Error(`parameter ${p.name}: enter a number`);
        parameters[p.name] = n;
      } else if (!(x === "" && p.required)) parameters[p.name] = x;
    }
    const body = { definition: d.name, parameters };
    if (ttl.value.trim() !== "") body.instruction_ttl = Number(ttl.value);
    if (keep.value.trim() !== "") body.response_ttl = Math.round(Number(keep.value) * 3600);
    return body;
  };
  draw();
  return self;
}

function fmtHours(seconds) {
  const hrs = seconds / 3600;
  return Number.isInteger(hrs) ? String(hrs) : hrs.toFixed(2).replace(/0+$/, "");
}
