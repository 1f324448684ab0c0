// Shell and router: #/login, #/ask, #/i/<id>, #/history, #/approvals, #/devices, #/d/<device>,
// #/switches, for Full and Group Administrators #/groups, and for Full Administrators #/users
// and #/audit. Nav badges (approvals waiting, instructions running) are kept live by polling
// with backoff.
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
import * as groups from "./views/groups.js";
import * as device from "./views/device.js";

const ROUTES = { login, ask, i: instruction, history, approvals, devices, d: device, switches, groups, users, audit };
const FULL_ADMIN = "Full Administrator";
// Pages for some roles only, in nav order (the API refuses everyone else anyway: 403).
const ROLE_ROUTES = [["groups", "Groups", [FULL_ADMIN, "Group Administrator"]], ["users", "Users", [FULL_ADMIN]],
  ["audit", "Audit", [FULL_ADMIN]]];
const allowed = (name, role) => ROLE_ROUTES.every(([r, , roles]) => r !== name || roles.includes(role));
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

// The entries of pages for some roles, in the nav of those roles only.
function adminNav(s) {
  const nav = document.getElementById("nav");
  for (const [route, label, roles] of ROLE_ROUTES) {
    const show = Boolean(s && roles.includes(s.role));
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

// Nav badges: how many instructions wait for approval and how many run, of those the caller may
// see. Polled every FAST ms while a count changes, backing off (doubling) to SLOW while none does;
// back to FAST on every page change or decision; paused while the tab is hidden.
const BADGES = [["approvals-badge", "pending_approval"], ["running-badge", "active,created"]];
const FAST = 2000;
const SLOW = 30000;
let badgeDelay = FAST;
let badgeTimer = null;
let badgeSeen = "";

async function refreshBadges() {
  let seen = "";
  for (const [id, status] of BADGES) {
    const badge = document.getElementById(id);
    try {
      const page = await api("GET", `/Instructions?status=${status}&limit=1`);
      badge.textContent = String(page.total);
      badge.hidden = page.total === 0;
      seen += `${page.total},`;
    } catch (_) {
      badge.hidden = true;
    }
  }
  const changed = seen !== badgeSeen;
  badgeSeen = seen;
  return changed;
}

let badgeRun = 0; // one polling loop: a restart ends the one before

function pollBadges(reset) {
  clearTimeout(badgeTimer);
  const run = ++badgeRun;
  if (reset) badgeDelay = FAST;
  const tick = async () => {
    if (run !== badgeRun || !session()) return;
    if (!document.hidden) {
      const changed = await refreshBadges();
      if (run !== badgeRun) return;
      badgeDelay = changed ? FAST : Math.min(badgeDelay * 2, SLOW);
    }
    badgeTimer = setTimeout(tick, badgeDelay);
  };
  tick();
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
  const view = allowed(name, s && s.role) ? ROUTES[name] : null;
  const section = { i: "history", d: "devices" }[name] || name;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.route === section);
  if (!view) {
    clear(main, message("error", "There is no such page. ", h("a", { href: "#/ask" }, "Ask a question")));
    return;
  }
  main.className = "main"; // a view may add its own layout class
  clear(main, h("div", { class: "loading" }, "Loading…"));
  try {
    await view.render(main, args, signal, query);
  } catch (e) {
    if (signal.aborted || e.name === "AbortError") return;
    clear(main, message("error", e.message || String(e)));
  }
  pollBadges(true);
}

window.addEventListener("hashchange", route);
window.addEventListener("quanta:approvals-changed", () => pollBadges(true));
document.addEventListener("visibilitychange", () => { if (!document.hidden) pollBadges(true); });
window.addEventListener("quanta:signed-out", () => { shell(null); if (!location.hash.startsWith("#/login")) location.hash = "#/login"; });
document.getElementById("logout").addEventListener("click", async () => {
  await signOut();
  shell(null);
  location.hash = "#/login";
});
route();
