// The Smithers console: a client of the public gateway protocol over WebSocket, nothing else.
// This module signs in, keeps the connection and routes `#/…` addresses to pages.

import { Conn, TOKEN_KEY, session, page, token, h, show, setConn } from "./core.js";
import { runsPage } from "./runs.js";
import { runPage } from "./run.js";
import { approvalsPage } from "./approvals.js";
import { startPage } from "./start.js";
import { signalsPage } from "./signals.js";
import { schedulesPage } from "./schedules.js";

async function connect() {
  setConn("connecting…");
  try {
    const live = new Conn(onEvent, () => { session.live = null; setConn("disconnected; reconnecting…"); setTimeout(connect, 1000); });
    const hello = await live.open(token());
    session.live = live;
    const auth = hello.auth || {};
    session.role = auth.role || null;
    session.scopes = auth.scopes || [];
    session.userId = auth.userId || null;
    setConn("connected" + (session.userId ? " as " + session.userId : "") + (session.role ? " (" + session.role + ")" : ""));
    document.getElementById("signout").hidden = !token();
    route();
  } catch (e) {
    if (session.live) session.live.close();
    session.live = null;
    if (e.code === "UNAUTHORIZED" || e.code === "Unauthorized" || e.code === "FORBIDDEN") signIn("[" + e.code + "] " + e.message);
    else { setConn("cannot reach the gateway; retrying…"); setTimeout(connect, 2000); }
  }
}

function signIn(message) {
  setConn("signed out");
  const input = h("input", { id: "token", type: "password", autocomplete: "off", "aria-describedby": "auth-error" });
  const form = h("form", { id: "signin", onsubmit: (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    connect();
  } },
  h("h1", { text: "Sign in" }),
  h("p", { class: "muted", text: "This gateway needs a token. It is kept for this tab only." }),
  h("div", { class: "field" }, h("label", { for: "token", text: "Token" }), input),
  h("p", { id: "auth-error", class: "error", role: "alert", text: message || "" }),
  h("button", { type: "submit", text: "Sign in" }));
  show("Sign in", form);
  input.focus();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  if (session.live) { session.live.closed = true; session.live.close(); }
  if (session.act) session.act.close();
  session.live = null;
  session.act = null;
  document.getElementById("signout").hidden = true;
  signIn("");
}

function onEvent(event, payload) {
  for (const l of page.listeners) l(event, payload);
}

function route() {
  if (!session.live) return;
  page.listeners.clear();
  for (const c of page.cleanups.splice(0)) { try { c(); } catch { /* a page's teardown must not stop the next page */ } }
  const hash = location.hash || "#/runs";
  for (const a of document.querySelectorAll("nav a")) {
    const here = a.getAttribute("href");
    if (hash === here || hash.startsWith(here + "/") || hash.startsWith(here + "?")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const m = path.match(/^\/runs\/(.+)$/);
  if (m) return runPage(decodeURIComponent(m[1]));
  if (path === "/approvals") return approvalsPage();
  if (path === "/start") return startPage(params);
  if (path === "/signals") return signalsPage(params);
  if (path === "/schedules") return schedulesPage();
  return runsPage();
}

document.getElementById("signout").addEventListener("click", signOut);
// the skip link moves focus without changing the route in the address
document.querySelector(".skip").addEventListener("click", (ev) => { ev.preventDefault(); document.getElementById("app").focus(); });
window.addEventListener("hashchange", route);
connect();
