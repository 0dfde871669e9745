// The Smithers console: a client of the public gateway protocol over WebSocket, nothing else.
// Everything that comes from runs is put on the page as text (textContent), never as HTML.

const TOKEN_KEY = "smithers.token";

/** One protocol connection: `connect` handshake, requests by id, events to a callback. */
class Conn {
  constructor(onEvent, onClose) {
    this.onEvent = onEvent;
    this.onClose = onClose;
    this.pending = new Map();
    this.next = 1;
  }

  open(token) {
    return new Promise((resolve, reject) => {
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/";
      const ws = new WebSocket(url);
      this.ws = ws;
      let hello = false;
      ws.onmessage = (m) => {
        let f;
        try { f = JSON.parse(m.data); } catch { return; }
        if (f.type === "event" && f.event === "connect.challenge" && !hello) {
          const params = { minProtocol: 1, maxProtocol: 1, client: { id: "smithers-console", version: "1", platform: "web" } };
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
        else this.onClose();
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

  close() { if (this.ws) this.ws.close(); }
}

// Two connections: `live` reads and receives every run's events; `act` makes changes. The
// gateway narrows a connection's events to the runs it starts or resumes, so changes go through
// a connection whose events nobody watches.
let live = null;
let act = null;
let role = null;
let scopes = [];
const listeners = new Set();

function h(tag, attrs, ...children) {
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

function app() { return document.getElementById("app"); }

function show(...nodes) {
  const a = app();
  a.replaceChildren(...nodes);
}

function setConn(text) { document.getElementById("conn").textContent = text; }

function fmtTime(ms) { return ms ? new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z") : "–"; }

function duration(run) {
  if (!run.createdAtMs) return "";
  const end = run.finishedAtMs || Date.now();
  const s = Math.max(0, Math.round((end - run.createdAtMs) / 1000));
  return s < 60 ? s + "s" : Math.floor(s / 60) + "m" + (s % 60) + "s";
}

/** Whether the caller's scopes allow a method of this level (read < execute < approve < admin). */
function can(level) {
  const rank = { read: 1, execute: 2, approve: 3, admin: 4 };
  if (scopes.includes("*")) return true;
  const have = Math.max(0, ...scopes.map((s) => rank[s] || 0));
  return have >= rank[level];
}

function denied(level) { return can(level) ? null : "your token lacks the " + level + " scope"; }

// ---------------------------------------------------------------------------------------------
// connection and sign-in

async function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  setConn("connecting…");
  try {
    live = new Conn(onEvent, () => { setConn("disconnected; reconnecting…"); setTimeout(connect, 1000); });
    const hello = await live.open(token);
    act = new Conn(() => {}, () => { act = null; });
    await act.open(token);
    role = hello.auth && hello.auth.role;
    scopes = (hello.auth && hello.auth.scopes) || [];
    setConn("connected" + (role ? " as " + role : ""));
    route();
  } catch (e) {
    if (live) live.close();
    live = null;
    if (e.code === "UNAUTHORIZED" || e.code === "Unauthorized" || e.code === "FORBIDDEN") signIn(e.message);
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
  h("div", { class: "field" }, h("label", { for: "token", text: "Token" }), input),
  h("p", { id: "auth-error", class: "error", role: "alert", text: message || "" }),
  h("button", { type: "submit", text: "Sign in" }));
  show(form);
  input.focus();
}

async function actOn(method, params) {
  if (!act) {
    act = new Conn(() => {}, () => { act = null; });
    await act.open(sessionStorage.getItem(TOKEN_KEY) || "");
  }
  return act.send(method, params);
}

function onEvent(event, payload) {
  for (const l of listeners) l(event, payload);
}

// ---------------------------------------------------------------------------------------------
// routing

function route() {
  if (!live) return;
  listeners.clear();
  const hash = location.hash || "#/runs";
  for (const a of document.querySelectorAll("nav a")) {
    if (hash.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const m = hash.match(/^#\/runs\/(.+)$/);
  if (m) return runPage(decodeURIComponent(m[1]));
  if (hash.startsWith("#/approvals")) return approvalsPage();
  if (hash.startsWith("#/start")) return startPage();
  return runsPage();
}

function failure(e) {
  const code = e.code ? "[" + e.code + "] " : "";
  return h("p", { class: "error", role: "alert", text: code + e.message });
}

// ---------------------------------------------------------------------------------------------
// runs

const STATUSES = ["running", "waiting-approval", "waiting-event", "waiting-timer", "finished", "failed", "cancelled", "continued", "needs-attention"];

function runsPage() {
  const filter = h("select", { id: "status-filter" }, h("option", { value: "", text: "all" }), STATUSES.map((s) => h("option", { value: s, text: s })));
  const search = h("input", { id: "run-search", type: "search", placeholder: "run id" });
  const body = h("tbody");
  const table = h("table", { id: "runs" }, h("thead", {}, h("tr", {}, h("th", { text: "Run" }), h("th", { text: "Workflow" }), h("th", { text: "Status" }), h("th", { text: "Started" }), h("th", { text: "Duration" }))), body);
  const msg = h("p", { class: "muted", role: "status" });
  let rows = [];
  const render = () => {
    const q = search.value.trim();
    const shown = rows.filter((r) => !q || r.runId.includes(q));
    body.replaceChildren(...shown.map((r) => h("tr", { "data-run-id": r.runId },
      h("td", {}, h("a", { href: "#/runs/" + encodeURIComponent(r.runId), text: r.runId })),
      h("td", { text: r.workflowKey || r.workflowName }),
      h("td", { class: "status status-" + r.status, text: r.status }),
      h("td", { text: fmtTime(r.createdAtMs) }),
      h("td", { text: duration(r) }))));
    msg.textContent = shown.length ? "" : "no runs";
  };
  let timer = null;
  const load = async () => {
    timer = null;
    try {
      const params = { limit: 500 };
      if (filter.value) params.status = filter.value;
      rows = await live.send("runs.list", params);
      render();
    } catch (e) { msg.replaceChildren(failure(e)); }
  };
  const soon = () => { if (!timer) timer = setTimeout(load, 150); };
  filter.addEventListener("change", load);
  search.addEventListener("input", render);
  listeners.add((event) => { if (event.startsWith("run.") || event.startsWith("node.") || event.startsWith("approval.")) soon(); });
  show(h("h1", { text: "Runs" }),
    h("div", { class: "filters" },
      h("div", {}, h("label", { for: "status-filter", text: "Status" }), filter),
      h("div", {}, h("label", { for: "run-search", text: "Search" }), search)),
    table, msg);
  load();
}

async function runPage(runId) {
  const status = h("span", { "data-field": "status" });
  const facts = h("dl");
  const nodes = h("ul", { id: "nodes", class: "plain" });
  const waiting = h("ul", { id: "pending", class: "plain" });
  const output = h("pre", { id: "output", "aria-label": "Task output" });
  const note = h("p", { role: "status", class: "muted" });
  const reason = denied("execute");
  const button = (id, text, run) => h("button", { id, class: "secondary", disabled: !!reason, title: reason, onclick: async () => {
    try { await run(); note.textContent = text + ": done"; } catch (e) { note.replaceChildren(failure(e)); }
  }, text });
  const actions = h("div", { class: "actions" },
    button("cancel", "Cancel", () => actOn("runs.cancel", { runId })),
    button("resume", "Resume", () => actOn("runs.resume", { runId })),
    button("rerun", "Rerun", async () => {
      const r = await actOn("runs.rerun", { runId });
      location.hash = "#/runs/" + encodeURIComponent(r.runId);
    }));
  show(h("section", { id: "run" },
    h("h1", {}, "Run ", h("code", { text: runId })),
    h("p", {}, "Status: ", status), facts, actions, note,
    waiting,
    h("h2", { text: "Nodes" }), nodes,
    h("h2", { text: "Task output" }), output));
  let lastSeq = -1;
  const refresh = async () => {
    try {
      const [run, attempts, approvals] = await Promise.all([
        live.send("runs.get", { runId }),
        live.send("attempts.list", { runId }),
        live.send("approvals.list", {}),
      ]);
      waiting.replaceChildren(...approvals.filter((a) => a.runId === runId).map((a) => h("li", { "data-node-id": a.nodeId },
        h("strong", { text: a.requestTitle || a.nodeId }), " (", a.nodeId, ") waits for a decision in ",
        h("a", { href: "#/approvals", text: "Approvals" }))));
      status.textContent = run.status;
      status.className = "status-" + run.status;
      facts.replaceChildren(
        h("dt", { text: "Workflow" }), h("dd", { text: run.workflowKey || run.workflowName }),
        h("dt", { text: "Created" }), h("dd", { text: fmtTime(run.createdAtMs) }),
        h("dt", { text: "Finished" }), h("dd", { text: fmtTime(run.finishedAtMs) }),
        h("dt", { text: "Duration" }), h("dd", { text: duration(run) }));
      const latest = new Map();
      for (const a of attempts) {
        const key = a.nodeId + "\u0000" + a.iteration;
        const seen = latest.get(key);
        if (!seen || a.attempt > seen.attempt) latest.set(key, a);
      }
      nodes.replaceChildren(...[...latest.values()].sort((x, y) => x.startedAtMs - y.startedAtMs).map((a) => h("li", { "data-node-id": a.nodeId },
        h("strong", { text: a.nodeId + (a.iteration ? "[" + a.iteration + "]" : "") }), " ",
        h("span", { class: "state status-" + a.state, text: a.state }), " ",
        h("span", { class: "muted", text: "attempt " + a.attempt + (a.finishedAtMs ? ", " + (a.finishedAtMs - a.startedAtMs) + " ms" : "") }),
        a.errorJson ? h("div", { class: "error", text: errorText(a.errorJson) }) : null)));
    } catch (e) { note.replaceChildren(failure(e)); }
  };
  const append = (p) => {
    if (typeof p.eventSeq === "number") {
      if (p.eventSeq <= lastSeq) return;
      lastSeq = p.eventSeq;
    }
    output.append(document.createTextNode(String(p.output ?? "")));
  };
  let timer = null;
  listeners.add((event, p) => {
    if (p.runId !== runId) return;
    if (event === "task.output") append(p);
    else if (!timer) timer = setTimeout(() => { timer = null; refresh(); }, 100);
  });
  await refresh();
  try {
    for (;;) {
      const page = await live.send("runs.events", { runId, afterSeq: lastSeq, limit: 10000 });
      for (const e of page.events) if (e.event === "task.output") append(e.payload);
      if (typeof page.lastSeq === "number" && page.lastSeq > lastSeq) lastSeq = page.lastSeq;
      if (!page.more) break;
    }
  } catch (e) { note.replaceChildren(failure(e)); }
}

function errorText(json) {
  try { const e = JSON.parse(json); return (e.code ? "[" + e.code + "] " : "") + (e.message || json); } catch { return json; }
}

// ---------------------------------------------------------------------------------------------
// approvals

function approvalsPage() {
  const list = h("ul", { id: "approvals", class: "plain" });
  const msg = h("p", { role: "status", class: "muted" });
  const reason = denied("approve");
  const load = async () => {
    try {
      const items = await live.send("approvals.list", {});
      msg.textContent = items.length ? "" : "no approvals are waiting";
      list.replaceChildren(...items.map((a) => approvalItem(a, reason, msg)));
    } catch (e) { msg.replaceChildren(failure(e)); }
  };
  listeners.add((event) => { if (event.startsWith("approval.") || event === "run.completed") load(); });
  show(h("h1", { text: "Approvals" }), msg, list);
  load();
}

function approvalItem(a, reason, msg) {
  const id = "note-" + a.runId + "-" + a.nodeId + "-" + a.iteration;
  const note = h("input", { class: "note", id, type: "text" });
  const mode = a.approvalMode || "gate";
  const options = a.options || [];
  let choice = null;
  if (mode === "select") {
    choice = h("select", { class: "choice", "aria-label": "Choice" }, options.map((o) => h("option", { value: o.key, text: o.label })));
  } else if (mode === "rank") {
    choice = h("input", { class: "choice", type: "text", "aria-label": "Order (keys, comma-separated)", value: options.map((o) => o.key).join(",") });
  }
  const decide = async (approved) => {
    const params = { runId: a.runId, nodeId: a.nodeId, iteration: a.iteration, approved };
    if (note.value.trim()) params.note = note.value.trim();
    if (approved && mode === "select") params.decision = { selected: choice.value };
    if (approved && mode === "rank") params.decision = { ranked: choice.value.split(",").map((s) => s.trim()).filter(Boolean) };
    try { await actOn("approvals.decide", params); msg.textContent = (approved ? "approved " : "denied ") + a.nodeId; }
    catch (e) { msg.replaceChildren(failure(e)); }
  };
  return h("li", { "data-run-id": a.runId, "data-node-id": a.nodeId },
    h("strong", { text: a.requestTitle || a.nodeId }), " ",
    h("a", { href: "#/runs/" + encodeURIComponent(a.runId), text: a.runId }),
    a.requestSummary ? h("p", { text: typeof a.requestSummary === "string" ? a.requestSummary : JSON.stringify(a.requestSummary) }) : null,
    choice ? h("div", { class: "field" }, choice) : null,
    h("div", { class: "field" }, h("label", { for: id, text: "Note" }), note),
    h("div", { class: "actions" },
      h("button", { class: "approve", disabled: !!reason, title: reason, onclick: () => decide(true), text: "Approve" }),
      h("button", { class: "deny secondary", disabled: !!reason, title: reason, onclick: () => decide(false), text: "Deny" })));
}

// ---------------------------------------------------------------------------------------------
// start a run

async function startPage() {
  const select = h("select", { id: "workflow" });
  const fields = h("div");
  const msg = h("p", { role: "status", class: "muted" });
  const reason = denied("execute");
  const submit = h("button", { type: "submit", disabled: !!reason, title: reason, text: "Start" });
  let workflows = [];
  const form = h("form", { id: "start-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const wf = workflows.find((w) => w.key === select.value);
    if (!wf) return;
    const input = collect(wf.inputSchema, fields);
    if (!input) return;
    try {
      const r = await actOn("runs.create", { workflow: wf.key, input });
      location.hash = "#/runs/" + encodeURIComponent(r.runId);
    } catch (e) { msg.replaceChildren(failure(e)); }
  } },
  h("div", { class: "field" }, h("label", { for: "workflow", text: "Workflow" }), select),
  fields, submit);
  show(h("h1", { text: "Start a run" }), form, msg);
  try {
    workflows = (await live.send("workflows.list", {})).workflows || [];
  } catch (e) { msg.replaceChildren(failure(e)); return; }
  select.replaceChildren(...workflows.map((w) => h("option", { value: w.key, text: w.key + (w.description ? " — " + w.description : "") })));
  const build = () => {
    const wf = workflows.find((w) => w.key === select.value);
    fields.replaceChildren(...schemaFields(wf && wf.inputSchema));
  };
  select.addEventListener("change", build);
  build();
}

/** One input per top-level property of the input schema. */
function schemaFields(schema) {
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  return Object.entries(props).map(([name, p]) => {
    const id = "in-" + name;
    const type = p && p.type;
    let input;
    if (type === "boolean") input = h("input", { id, name, type: "checkbox" });
    else if (type === "object" || type === "array") input = h("textarea", { id, name, rows: 3, placeholder: type === "array" ? "[ ]" : "{ }" });
    else if (Array.isArray(p && p.enum)) input = h("select", { id, name }, h("option", { value: "", text: "" }), p.enum.map((v) => h("option", { value: String(v), text: String(v) })));
    else input = h("input", { id, name, type: type === "number" || type === "integer" ? "number" : "text", "aria-describedby": "err-" + name });
    return h("div", { class: "field" },
      h("label", { for: id, text: name + (required.has(name) ? " (required)" : "") }),
      p && p.description ? h("p", { class: "muted", text: p.description }) : null,
      input,
      h("p", { class: "error", id: "err-" + name, "data-for": name, role: "alert" }));
  });
}

/** The form's values as the run input, or null (with messages in place) when one is wrong. */
function collect(schema, fields) {
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  const input = {};
  let ok = true;
  for (const [name, p] of Object.entries(props)) {
    const el = fields.querySelector('[name="' + CSS.escape(name) + '"]');
    const err = fields.querySelector('.error[data-for="' + CSS.escape(name) + '"]');
    err.textContent = "";
    if (!el) continue;
    const type = p && p.type;
    if (type === "boolean") { input[name] = el.checked; continue; }
    const raw = el.value.trim();
    if (!raw) {
      if (required.has(name)) { err.textContent = name + " is required"; ok = false; }
      continue;
    }
    if (type === "number" || type === "integer") {
      const n = Number(raw);
      if (!Number.isFinite(n) || (type === "integer" && !Number.isInteger(n))) { err.textContent = name + " must be " + (type === "integer" ? "an integer" : "a number"); ok = false; continue; }
      input[name] = n;
    } else if (type === "object" || type === "array") {
      try { input[name] = JSON.parse(raw); } catch { err.textContent = name + " must be JSON"; ok = false; }
    } else input[name] = raw;
  }
  return ok ? input : null;
}

window.addEventListener("hashchange", route);
connect();
