// The only backend: the public Consumer API. The bearer token lives in sessionStorage (per tab,
// gone when the tab closes, never sent automatically like a cookie).

const KEY = "quanta.explorer.session";

// The token is short-lived but renewed by the server on every use; the tab keeps it until its
// absolute end (or a 401 says the server ended it: idle too long, signed out, disabled).
export function session() {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) || "null");
    if (s && s.token && (s.absolute_expires_at || s.expires_at) * 1000 > Date.now()) return s;
  } catch (_) { /* unreadable: treat as signed out */ }
  return null;
}

// Ends the session on the server (POST /Authentication/Logout: the token is refused from then
// on), then forgets it here whatever the answer (an ended or unreachable session included).
export async function signOut() {
  const s = session();
  sessionStorage.removeItem(KEY);
  if (!s) return;
  try {
    await fetch("/Consumer/Authentication/Logout", { method: "POST", cache: "no-store",
      headers: { Accept: "application/json", Authorization: `Bearer ${s.token}` } });
  } catch (_) { /* offline: the token ends by itself within minutes */ }
}

function forget() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(detailText(detail) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

// FastAPI details come as a string, a pydantic list of {loc, msg}, or an object (compile errors).
export function detailText(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  if (typeof detail === "object" && detail.message) {
    return detail.line ? `line ${detail.line}, column ${detail.column}: ${detail.message}` : detail.message;
  }
  return JSON.stringify(detail);
}

function headers(extra) {
  const h = { Accept: "application/json", ...extra };
  const s = session();
  if (s) h.Authorization = `Bearer ${s.token}`;
  return h;
}

function expired() {
  forget();
  window.dispatchEvent(new CustomEvent("quanta:signed-out"));
}

export async function api(method, path, body, { signal } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), cache: "no-store", signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(`/Consumer${path}`, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401 && path !== "/Authentication/Token") expired();
  if (!r.ok) throw new ApiError(r.status, data && typeof data === "object" && "detail" in data ? data.detail : data);
  return data;
}

// A download of an authenticated GET (the audit CSV): fetched with the token (a plain link would
// carry none), handed to the browser as a file.
export async function download(path, filename, { signal } = {}) {
  const r = await fetch(`/Consumer${path}`, { headers: headers({ Accept: "text/csv" }), cache: "no-store", signal });
  if (r.status === 401) expired();
  if (!r.ok) {
    let detail = null;
    try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement("a");
  a.href = url; // our own blob: URL, set directly (dom.h allows in-app links only)
  a.download = filename;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export async function signIn(username, password) {
  const t = await api("POST", "/Authentication/Token", { username, password });
  sessionStorage.setItem(KEY, JSON.stringify(t));
  return t;
}

// Server-sent events over fetch(), so the token goes in the Authorization header (EventSource
// cannot send headers, and a token in the URL would end up in logs). Calls onEvent(name, data)
// per event; resolves when the server ends the stream.
export async function stream(path, onEvent, signal) {
  const r = await fetch(`/Consumer${path}`, { headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal });
  if (r.status === 401) expired();
  if (!r.ok) {
    let detail = null;
    try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, detail);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf = (buf + value).replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const c = line.indexOf(":");
        const field = c < 0 ? line : line.slice(0, c);
        let v = c < 0 ? "" : line.slice(c + 1);
        if (v.startsWith(" ")) v = v.slice(1);
        if (field === "event") name = v;
        else if (field === "data") data.push(v);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
