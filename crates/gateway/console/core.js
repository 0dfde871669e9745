// Shared by every page: the protocol connection, who is signed in, element building and
// formatting. Everything that comes from runs goes on the page as text, never as HTML.

export const TOKEN_KEY = "smithers.token";

/** One protocol connection: `connect` handshake, requests by id, events to a callback. */
export class Conn {
  constructor(onEvent, onClose) {
    this.onEvent = onEvent || (() => {});
    this.onClose = onClose || (() => {});
    this.pending = new Map();
    this.next = 1;
    this.closed = false;
  }

  /** Opens the socket and says hello; `extra` adds connect params (e.g. `subscribe`). */
  open(token, extra) {
    return new Promise((resolve, reject) => {
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
      const ws = new WebSocket(url);
      this.ws = ws;
      let hello = false;
      ws.onmessage = (m) => {
        let f;
        try { f = JSON.parse(m.data); } catch { return; }
        if (f.type === "event" && f.event === "connect.challenge" && !hello) {
          const params = Object.assign({ minProtocol: 1, maxProtocol: 1, client: { id: "smithers-console", version: "1", platform: "web" } }, extra || {});
          if (token) params.auth = { token };
          this.send("connect", params).then((h) => { hello = true; resolve(h); }, reject);
          return;
        }
        if (f.type === "res") {
          const p = this.pending.get(f.id);
          if (!p) return;
          this.pending.delete(f.id);
          if (f.ok) p.resolve(f.payload);
          else p.reject(Object.assign(new Error((f.error && f.error.message) || "request failed"), { code: f.error && f.error.code }));
          return;
        }
        if (f.type === "event") this.onEvent(f.event, f.payload || {});
      };
      ws.onclose = () => {
        for (const p of this.pending.values()) p.reject(new Error("the connection closed"));
        this.pending.clear();
        if (!hello) reject(new Error("the gateway closed the connection"));
        else if (!this.closed) this.onClose();
      };
      ws.onerror = () => {};
    });
  }

  send(method, params) {
    const id = "c" + this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      try {
        this.ws.send(JSON.stringify({ type: "req", id, method, params: params || {} }));
      } catch (e) {
        this.pending.delete(id);
        reject(e);
      }
    });
  }

  close() { this.closed = true; if (this.ws) this.ws.close(); }
}

/**
 * Session state. `live` reads and receives every run's events; `act` makes changes: the gateway
 * narrows a connection's events to the runs it starts or resumes, so changes go through a
 * connection whose events nobody watches.
 */
export const session = { live: null, act: null, role: null, scopes: [], userId: null };

/** Listeners for `live` events and teardown work of the current page; both reset per route. */
export const page = { listeners: new Set(), cleanups: [] };

export function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

export async function actOn(method, params) {
  if (!session.act) {
    const c = new Conn(null, () => { session.act = null; });
    await c.open(token());
    session.act = c;
  }
  return session.act.send(method, params);
}

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = String(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces the page, names it in the title and moves focus to its heading. */
export function show(title, ...nodes) {
  document.title = title + " · Smithers";
  const main = document.getElementById("app");
  main.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined && n !== false));
  const h1 = main.querySelector("h1");
  if (h1) { h1.setAttribute("tabindex", "-1"); h1.focus({ preventScroll: true }); }
}

export function setConn(text) { document.getElementById("conn").textContent = text; }

export function fmtTime(ms) { return ms ? new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z") : "–"; }

export function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "";
  if (ms < 1000) return Math.round(ms) + " ms";
  const s = Math.round(ms / 1000);
  return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
}

export function runDuration(run) {
  if (!run.createdAtMs) return "";
  return fmtMs((run.finishedAtMs || Date.now()) - run.createdAtMs);
}

export function json(v) {
  try { return JSON.stringify(v, null, 2); } catch { return String(v); }
}

export function parseJson(text, fallback) {
  if (typeof text !== "string") return text === undefined ? fallback : text;
  try { return JSON.parse(text); } catch { return fallback; }
}

/** Whether the caller's scopes allow a method of this level (read < execute < approve < admin). */
export function can(level) {
  const rank = { read: 1, execute: 2, approve: 3, admin: 4 };
  if (session.scopes.includes("*")) return true;
  const have = Math.max(0, ...session.scopes.map((s) => rank[String(s).trim()] || 0));
  return have >= rank[level];
}

/** Why an action of this level is unavailable, or null when it is allowed. */
export function denied(level) { return can(level) ? null : "your token lacks the " + level + " scope"; }

/** An error as the page shows it: the protocol code and message, announced to screen readers. */
export function failure(e) {
  const code = e.code ? "[" + e.code + "] " : "";
  return h("p", { class: "error", role: "alert", text: code + e.message });
}

/** A button that runs an action and reports its outcome in `note`; disabled with a reason. */
export function actionButton(attrs, text, reason, run, note) {
  return h("button", Object.assign({ type: "button", disabled: !!reason, title: reason || undefined, "aria-disabled": reason ? "true" : undefined }, attrs, {
    onclick: async () => {
      try { const msg = await run(); if (note && msg !== false) note.textContent = msg || text + ": done"; }
      catch (e) { if (note) note.replaceChildren(failure(e)); }
    },
  }), text);
}

/** Runs `fn` at most once per `ms`, trailing. */
export function debounce(fn, ms) {
  let t = null;
  const wrapped = () => { if (!t) t = setTimeout(() => { t = null; fn(); }, ms); };
  page.cleanups.push(() => { if (t) clearTimeout(t); });
  return wrapped;
}

export const STATUSES = ["running", "waiting-approval", "waiting-event", "waiting-timer", "finished", "failed", "cancelled", "continued", "needs-attention"];
