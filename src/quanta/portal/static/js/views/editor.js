// The SCALE editor of the Ask page: the payload textarea over a highlighted copy of its text, a
// method browser fed by the method registry (GET /Consumer/Methods) and an inline syntax check by
// the server's own compiler (POST /Consumer/Scale/Check), its error marked where it is.
//
// The highlighted copy is built from text nodes only (dom.h): whatever the payload holds, markup
// included, is shown as the characters it is.
import { api } from "../api.js";
import { clear, h } from "../dom.js";

// As the lexer and parser read them (src/quanta/scale/lexer.py, parser.py).
const KEYWORDS = new Set(["FOREACH", "IN", "DO", "DONE", "IF", "NOT", "ELSE", "ENDIF", "EVALUATE", "NOCONTENT",
  "ERROR", "NOTIMPLEMENTED", "RETURN"]);
const SQL_AFTER = new Set(["DO", "ELSE", "ENDIF", "DONE"]); // after these a SELECT starts an SQL statement
const SQL_KEYWORDS = new Set(("SELECT WITH FROM WHERE GROUP BY ORDER HAVING LIMIT OFFSET AS AND OR NOT IN IS NULL " +
  "LIKE GLOB REGEXP BETWEEN CASE WHEN THEN ELSE END DISTINCT ALL UNION INTERSECT EXCEPT JOIN LEFT RIGHT FULL " +
  "INNER OUTER CROSS NATURAL ON USING ASC DESC EXISTS CAST COLLATE ESCAPE RECURSIVE VALUES TRUE FALSE").split(" "));
const CHECK_DELAY_MS = 400;

const NAME = /[A-Za-z_][A-Za-z0-9_]*/y;
const NUMBER = /-?[0-9]+(?:\.[0-9]+)?/y;
const CALL = /[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*/y;
const VAR = /@[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?/y;
const SQL_VAR = /[@$][A-Za-z_][A-Za-z0-9_]*/y;
const PARAM = /%[A-Za-z_][A-Za-z0-9_]*%/y;
const SPACE = /\s+/y;

function match(re, text, i) {
  re.lastIndex = i;
  const m = re.exec(text);
  return m ? m[0] : null;
}

// The end of a string starting at i (its closing quote included; the text's end when unterminated).
function stringEnd(text, i) {
  const q = text[i];
  let j = i + 1;
  while (j < text.length) {
    if (q === '"' && text[j] === "\\" && (text[j + 1] === '"' || text[j + 1] === "\\")) j += 2;
    else if (text[j] === q && text[j + 1] === q) j += 2;
    else if (text[j] === q) return j + 1;
    else j += 1;
  }
  return text.length;
}

function commentEnd(text, i) {
  if (text[i + 1] === "*") {
    const j = text.indexOf("*/", i + 2);
    return j < 0 ? text.length : j + 2;
  }
  const j = text.indexOf("\n", i);
  return j < 0 ? text.length : j;
}

// A SELECT statement from i up to its ';' (or the end): [kind, text] pieces.
function sqlTokens(text, i, out) {
  while (i < text.length) {
    const c = text[i];
    const n = text[i + 1];
    let m;
    if (c === ";") { out.push(["punct", ";"]); return i + 1; }
    if ((m = match(SPACE, text, i))) { out.push(["", m]); i += m.length; continue; }
    if ((c === "-" && n === "-") || (c === "/" && (n === "/" || n === "*"))) {
      const j = commentEnd(text, i);
      out.push(["com", text.slice(i, j)]); i = j;
    } else if (c === "'" || c === '"') {
      const j = stringEnd(text, i); out.push(["str", text.slice(i, j)]); i = j;
    } else if (c === "[" || c === "`") {
      const k = text.indexOf(c === "[" ? "]" : "`", i + 1);
      const j = k < 0 ? text.length : k + 1;
      out.push(["qid", text.slice(i, j)]); i = j;
    } else if ((m = match(SQL_VAR, text, i))) {
      out.push([c === "@" ? "var" : "table", m]); i += m.length;
    } else if (c === "%" && (m = match(PARAM, text, i))) {
      out.push(["param", m]); i += m.length;
    } else if ((m = match(NAME, text, i))) {
      out.push([SQL_KEYWORDS.has(m.toUpperCase()) ? "sql" : "", m]); i += m.length;
    } else if (/[0-9]/.test(c) && (m = match(NUMBER, text, i))) {
      out.push(["num", m]); i += m.length;
    } else {
      out.push(["", c]); i += 1;
    }
  }
  return i;
}

// The payload as [kind, text] pieces whose texts joined are the payload. Lenient where the lexer
// is strict (an unterminated string runs to the end): the check says what is wrong.
export function tokenize(text) {
  const out = [];
  let prev = null; // the last significant piece outside SQL: [kind, text]
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    const n = text[i + 1];
    let m;
    if ((m = match(SPACE, text, i))) {
      out.push(["", m]); i += m.length; continue;
    }
    const start = out.length;
    if (c === "/" && (n === "/" || n === "*")) {
      const j = commentEnd(text, i); out.push(["com", text.slice(i, j)]); i = j; continue;
    }
    if ((m = match(CALL, text, i))) {
      out.push(["call", m]); i += m.length;
    } else if ((m = match(NAME, text, i))) {
      const up = m.toUpperCase();
      const sqlStarts = (up === "SELECT" || up === "WITH") && (prev === null || prev[0] === "sqlend"
        || (prev[0] === "punct" && ";=)".includes(prev[1])) || (prev[0] === "word" && SQL_AFTER.has(prev[1].toUpperCase())));
      if (sqlStarts) {
        out.push(["sql", m]);
        i = sqlTokens(text, i + m.length, out);
        prev = ["sqlend", ""];
        continue;
      }
      out.push([KEYWORDS.has(up) ? "kw" : up === "TRUE" || up === "FALSE" ? "bool" : "", m]); i += m.length;
      prev = ["word", m];
      continue;
    } else if ((m = match(VAR, text, i))) {
      out.push(["var", m]); i += m.length;
    } else if (c === "%" && (m = match(PARAM, text, i))) {
      out.push(["param", m]); i += m.length;
    } else if ((/[0-9]/.test(c) || (c === "-" && /[0-9]/.test(n || ""))) && (m = match(NUMBER, text, i))) {
      out.push(["num", m]); i += m.length;
    } else if (c === '"' || c === "'") {
      const j = stringEnd(text, i); out.push(["str", text.slice(i, j)]); i = j;
    } else {
      out.push(["=;(),:.".includes(c) ? "punct" : "", c]); i += 1;
    }
    prev = out[start];
  }
  return out;
}

// The index in `text` (UTF-16) of 1-based line/column as the server counts them (characters:
// code points); past the end of a line or of the text, its end.
export function offsetOf(text, line, column) {
  const lines = text.split("\n");
  const l = Math.min(Math.max(line, 1), lines.length);
  let at = 0;
  for (let k = 0; k < l - 1; k++) at += lines[k].length + 1;
  const chars = Array.from(lines[l - 1]);
  return at + chars.slice(0, Math.max(0, Math.min(column - 1, chars.length))).join("").length;
}

// The highlighted copy: a span per token kind, plain text nodes for the rest; the piece from
// `errorAt` to the end of its token is marked (a marker at the end when the error is there).
function paint(target, text, errorAt) {
  const pieces = [];
  let at = 0;
  for (const [kind, t] of tokenize(text)) {
    const end = at + t.length;
    if (errorAt !== null && errorAt >= at && errorAt < end) {
      if (errorAt > at) pieces.push(piece(kind, t.slice(0, errorAt - at)));
      pieces.push(piece(`${kind} tk-error`, t.slice(errorAt - at)));
    } else if (!kind && typeof pieces[pieces.length - 1] === "string") pieces[pieces.length - 1] += t;
    else pieces.push(piece(kind, t));
    at = end;
  }
  if (errorAt !== null && errorAt >= text.length) pieces.push(piece("tk-error tk-eof", " "));
  clear(target, ...pieces, "\n "); // the last line shows even when empty: heights and scrolling match
}

function piece(kind, t) {
  if (!kind) return t; // a text node
  return h("span", { class: kind.split(" ").map((k) => (k.startsWith("tk-") ? k : `tk-${k}`)).join(" ") }, t);
}

// ------------------------------------------------------------------ method browser
function templateValue(p) {
  if (p.type === "table") return "@table";
  if (p.type === "string") return '""';
  return p.type === "boolean" ? "false" : "0";
}

// What a click inserts: the call with its required parameters; on a line of its own, as a
// statement (@name = ...;).
export function callTemplate(m, ownLine) {
  const args = m.params.filter((p) => p.required).map((p) => `${p.name}: ${templateValue(p)}`).join(", ");
  const call = `${m.module}.${m.name}(${args})`;
  if (!ownLine) return call;
  const base = m.name.replace(/^Get(?=[A-Z])/, "");
  return `@${base.charAt(0).toLowerCase()}${base.slice(1)} = ${call};`;
}

function insertAtCursor(textarea, m) {
  const v = textarea.value;
  const start = textarea.selectionStart;
  const end = textarea.selectionEnd;
  const lineStart = v.lastIndexOf("\n", start - 1) + 1;
  let lineEnd = v.indexOf("\n", end);
  if (lineEnd < 0) lineEnd = v.length;
  const ownLine = !v.slice(lineStart, start).trim() && !v.slice(end, lineEnd).trim();
  const text = callTemplate(m, ownLine);
  textarea.focus();
  textarea.setSelectionRange(start, end);
  // insertText keeps the browser's undo history; setRangeText where it is not available
  if (!document.execCommand || !document.execCommand("insertText", false, text)) {
    textarea.setRangeText(text, start, end, "end");
    textarea.dispatchEvent(new Event("input", { bubbles: true }));
  }
  const quote = text.indexOf('""');
  if (quote >= 0) textarea.setSelectionRange(start + quote + 1, start + quote + 1); // inside the first ""
}

function methodInfo(m) {
  const params = m.params.length
    ? h("table", { class: "data mb-params" },
      h("thead", {}, h("tr", {}, h("th", {}, "Parameter"), h("th", {}, "Type"), h("th", {}, ""))),
      h("tbody", {}, ...m.params.map((p) => h("tr", {},
        h("td", { class: "mono" }, p.name, p.aliases.length ? h("span", { class: "muted" }, ` (${p.aliases.join(", ")})`) : null),
        h("td", {}, p.type),
        h("td", {}, p.required ? h("span", { class: "req" }, "required")
          : p.default === null ? h("span", { class: "muted" }, "optional") : h("span", { class: "mono" }, `= ${JSON.stringify(p.default)}`),
        p.description ? h("div", { class: "muted small" }, p.description) : null)))))
    : h("p", { class: "muted small" }, "No parameters.");
  const columns = m.dynamic_columns
    ? h("p", { class: "muted small" }, "Columns depend on the arguments.")
    : h("ul", { class: "mb-columns" }, ...m.columns.map((c) => h("li", { title: c.description || null },
      h("span", { class: "mono" }, c.name), " ", h("span", { class: "muted" }, c.type))));
  return [
    h("div", { class: "mb-info-head" }, h("strong", { class: "mono" }, `${m.module}.${m.name}`), " ",
      m.is_action ? h("span", { class: "badge kind-action" }, "Action") : h("span", { class: "badge kind-question" }, "Question")),
    h("p", { class: "small" }, m.description),
    m.is_action ? h("p", { class: "small mb-action-note" }, "Changes the device: a payload that calls it waits for approval.") : null,
    params,
    h("div", { class: "small mb-columns-head" }, "Columns"), columns,
    h("p", { class: "muted small" }, `Platforms: ${m.platforms.join(", ")}`),
  ];
}

// The panel, and load() to fetch the registry (once, when the panel is first shown).
function methodBrowser(textarea, signal) {
  const search = h("input", { type: "search", id: "method-search", placeholder: "Search methods", "aria-label": "Search methods",
    autocomplete: "off", spellcheck: "false" });
  const list = h("div", { class: "mb-list", id: "method-list", role: "list" }, h("p", { class: "muted small" }, "Loading methods…"));
  const info = h("div", { class: "mb-info", id: "method-info", "aria-live": "polite" },
    h("p", { class: "muted small" }, "Click a method to insert it at the cursor."));
  const panel = h("aside", { class: "method-browser", id: "method-browser", "aria-label": "SCALE methods" },
    h("div", { class: "mb-head" }, h("strong", {}, "Methods"), h("span", { class: "muted small", id: "method-count" }, "")),
    search, list, info);
  const items = [];

  function filter() {
    const terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const { el, hay } of items) {
      el.hidden = !terms.every((t) => hay.includes(t));
      if (!el.hidden) shown += 1;
    }
    for (const group of list.querySelectorAll(".mb-module")) {
      group.hidden = !group.querySelector(".mb-item:not([hidden])");
    }
    panel.querySelector("#method-count").textContent = `${shown} of ${items.length}`;
    const none = list.querySelector(".mb-none");
    if (none) none.hidden = shown > 0;
  }
  search.addEventListener("input", filter);
  search.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter") return;
    ev.preventDefault(); // never submits the Ask form
    const first = items.find((x) => !x.el.hidden);
    if (first) first.el.click();
  });

  const load = () => api("GET", "/Methods", undefined, { signal }).then((methods) => {
    const modules = [...new Set(methods.map((m) => m.module))];
    clear(list, ...modules.map((mod) => h("div", { class: "mb-module", role: "group", "aria-label": mod },
      h("div", { class: "mb-module-name" }, mod),
      ...methods.filter((m) => m.module === mod).map((m) => {
        const el = h("button", { type: "button", class: "mb-item", role: "listitem", "data-method": `${m.module}.${m.name}`,
          "data-action": m.is_action ? "true" : "false", title: m.description,
          onclick: () => {
            for (const x of items) x.el.classList.toggle("current", x.el === el);
            insertAtCursor(textarea, m);
            clear(info, ...methodInfo(m));
          } },
        h("span", { class: "mono" }, m.name),
        m.is_action ? h("span", { class: "badge kind-action mb-action", title: "changes the device" }, "action") : null);
        items.push({ el, hay: [`${m.module}.${m.name}`, m.description, ...m.params.map((p) => p.name),
          ...m.columns.map((c) => c.name)].join(" ").toLowerCase() });
        return el;
      }))), h("p", { class: "muted small mb-none", hidden: true }, "No method matches."));
    filter();
  }).catch((e) => {
    if (signal.aborted || e.name === "AbortError") return;
    clear(list, h("p", { class: "muted small" }, `Methods could not be loaded: ${e.message}`));
  });
  return { panel, load };
}

// ------------------------------------------------------------------ the editor
// `textarea` and `gutter` are the Ask page's; returns the element to put where they were.
export function scaleEditor(textarea, gutter, signal) {
  const code = h("code", {});
  const overlay = h("pre", { class: "scale-hl", "aria-hidden": "true" }, code);
  const check = h("div", { class: "scale-check", id: "scale-check", role: "status", "aria-live": "polite" });
  let error = null; // {line, column, message} of the current text, from the server
  let painted = false;
  let timer = 0;
  let inflight = null;
  let seq = 0;

  function repaint() {
    painted = false;
    paint(code, textarea.value, error ? offsetOf(textarea.value, error.line || 1, error.column || 1) : null);
    overlay.scrollTop = textarea.scrollTop;
    overlay.scrollLeft = textarea.scrollLeft;
  }
  function schedulePaint() {
    if (painted) return;
    painted = true;
    requestAnimationFrame(repaint);
  }
  function goTo(e) {
    const at = offsetOf(textarea.value, e.line || 1, e.column || 1);
    textarea.focus();
    textarea.setSelectionRange(at, at);
  }
  function show(result) {
    check.classList.remove("stale");
    if (result.ok) {
      check.dataset.state = "ok";
      delete check.dataset.line;
      delete check.dataset.column;
      clear(check, h("span", { class: "scale-ok" }, "✓ "), result.kind === "action"
        ? `An action (calls ${result.actions.join(", ")}): it runs only after a second person approves.`
        : "A question: the compiler finds no error.");
      return;
    }
    const e = result.error;
    Object.assign(check.dataset, { state: "error", line: String(e.line), column: String(e.column) });
    clear(check, h("span", { class: "scale-bad" }, "✗ "),
      e.line ? h("button", { type: "button", class: "btn btn-link scale-pos", onclick: () => goTo(e) },
        `Line ${e.line}, column ${e.column}`) : null,
      e.line ? ": " : null, h("span", { class: "scale-msg" }, e.message));
  }
  async function runCheck() {
    const text = textarea.value;
    const mine = ++seq;
    if (inflight) inflight.abort();
    if (!text.trim()) {
      error = null;
      check.dataset.state = "";
      check.classList.remove("stale");
      clear(check);
      schedulePaint();
      return;
    }
    const ctl = new AbortController();
    inflight = ctl;
    const abort = () => ctl.abort();
    signal.addEventListener("abort", abort, { once: true });
    try {
      const result = await api("POST", "/Scale/Check", { payload: text }, { signal: ctl.signal });
      if (mine !== seq || textarea.value !== text) return; // typed on since: its own check follows
      error = result.ok ? null : result.error;
      show(result);
      schedulePaint();
    } catch (e) {
      if (e.name === "AbortError" || mine !== seq) return;
      check.dataset.state = "unavailable";
      clear(check, h("span", { class: "muted" }, `The syntax check is not available: ${e.message}`));
    } finally {
      signal.removeEventListener("abort", abort);
    }
  }
  function scheduleCheck() {
    clearTimeout(timer);
    timer = setTimeout(runCheck, CHECK_DELAY_MS);
  }

  textarea.addEventListener("input", () => {
    error = null; // positions moved: the mark waits for the next answer
    check.classList.add("stale");
    schedulePaint();
    scheduleCheck();
  });
  textarea.addEventListener("scroll", () => {
    overlay.scrollTop = textarea.scrollTop;
    overlay.scrollLeft = textarea.scrollLeft;
  });
  signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
  textarea.classList.add("scale-input");
  repaint();
  const browser = methodBrowser(textarea, signal);
  // The registry is read and the text checked once the editor is shown (the raw panel stays
  // hidden for users who ask through instruction definitions).
  const shown = new IntersectionObserver((entries) => {
    if (!entries.some((e) => e.isIntersecting)) return;
    shown.disconnect();
    browser.load();
    if (!check.dataset.state) scheduleCheck();
  });
  shown.observe(textarea);
  signal.addEventListener("abort", () => shown.disconnect(), { once: true });

  return h("div", { class: "scale-editor" },
    h("div", { class: "scale-main" },
      h("div", { class: "editor" }, gutter, h("div", { class: "scale-field" }, overlay, textarea)),
      check),
    browser.panel);
}
