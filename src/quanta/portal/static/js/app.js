// Shell and router: #/login, #/ask, #/i/<id>, #/history, #/approvals, #/devices, #/switches,
// and for Full Administrators #/users and #/audit.
import { api, session, signOut } from "./api.js";
import { clear, h, message } from "./dom.js";
import * as login from "./views/login.js";
import * as ask from "./views/ask.js";
import * as instruction from "./views/instruction.js";
import * as history from "./views/history.js";
import * as approvals from "./views/approvals.js";
import * as devices from "./views/devices.js";
import * as switches from "./views/switches.js";
import * as users from "./views/users.js";
import * as audit from "./views/audit.js";

const ROUTES = { login, ask, i: instruction, history, approvals, devices, switches, users, audit };
const ADMIN_ROUTES = new Set(["users", "audit"]);
const FULL_ADMIN = "Full Administrator";
const main = document.getElementById("main");
let current = null; // AbortController of the view on screen

// "#/i/12?state=success&limit=25" -> {name: "i", args: ["12"], query: URLSearchParams}
// Where each role starts: an Approver on the approvals waiting for them, a Viewer on the history,
// everyone else on Ask.
function home(role) {
  return role === "Approver" ? "approvals" : role === "Viewer" ? "history" : "ask";
}

function parse() {
  const raw = location.hash.replace(/^#\/?/, "");
  const q = raw.indexOf("?");
  const path = q < 0 ? raw : raw.slice(0, q);
  const s = session();
  const parts = (path || home(s && s.role)).split("/").map((x) => { try { return decodeURIComponent(x); } catch (_) { return x; } });
  return { name: parts[0], args: parts.slice(1), query: new URLSearchParams(q < 0 ? "" : raw.slice(q + 1)) };
}

// The administrators' entries, added to the nav for Full Administrators only (the API refuses
// everyone else anyway: these pages are 403 for them).
function adminNav(s) {
  const nav = document.getElementById("nav");
  const show = Boolean(s && s.role === FULL_ADMIN);
  for (const [route, label] of [["users", "Users"], ["audit", "Audit"]]) {
    let a = nav.querySelector(`a[data-route="${route}"]`);
    if (show && !a) nav.append(h("a", { href: `#/${route}`, dataset: { route } }, label));
    else if (!show && a) a.remove();
  }
}

function shell(s) {
  adminNav(s);
  document.getElementById("nav").hidden = !s;
  document.getElementById("userbox").hidden = !s;
  if (s) {
    document.getElementById("user-name").textContent = s.username;
    document.getElementById("user-role").textContent = s.role;
  }
}

async function refreshApprovalsBadge() {
  const badge = document.getElementById("approvals-badge");
  try {
    const page = await api("GET", "/Instructions?status=pending_approval&limit=1");
    badge.textContent = String(page.total);
    badge.hidden = page.total === 0;
  } catch (_) {
    badge.hidden = true;
  }
}

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const { signal } = current;
  let { name, args, query } = parse();
  const s = session();
  if (!s && name !== "login") {
    const back = location.hash && !location.hash.startsWith("#/login") ? location.hash : "";
    sessionStorage.setItem("quanta.explorer.after-login", back);
    location.replace("#/login");
    return;
  }
  if (s && name === "login") name = home(s.role);
  shell(s);
  const view = ADMIN_ROUTES.has(name) && s.role !== FULL_ADMIN ? null : ROUTES[name];
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.route === (name === "i" ? "history" : name));
  }
  if (!view) {
    clear(main, message("error", "There is no such page. ", h("a", { href: "#/ask" }, "Ask a question")));
    return;
  }
  clear(main, h("div", { class: "loading" }, "Loading…"));
  try {
    await view.render(main, args, signal, query);
  } catch (e) {
    if (signal.aborted || e.name === "AbortError") return;
    clear(main, message("error", e.message || String(e)));
  }
  if (s) refreshApprovalsBadge();
}

window.addEventListener("hashchange", route);
window.addEventListener("quanta:approvals-changed", refreshApprovalsBadge);
window.addEventListener("quanta:signed-out", () => { shell(null); if (!location.hash.startsWith("#/login")) location.hash = "#/login"; });
document.getElementById("logout").addEventListener("click", async () => {
  await signOut();
  shell(null);
  location.hash = "#/login";
});
route();
