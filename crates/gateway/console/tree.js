// The workflow tree of a run as DevTools snapshots and deltas describe it, drawn with each
// node's state from the run's attempts.

import { h, fmtMs, parseJson } from "./core.js";

/** A deep copy, so that applying deltas never changes a snapshot someone else holds. */
function clone(n) { return JSON.parse(JSON.stringify(n)); }

/**
 * Applies a DevTools delta to a tree and returns the new root. Throws when an op names a node
 * the tree does not have; the caller then asks for a fresh snapshot.
 */
export function applyDelta(root, delta) {
  const byId = new Map();
  const parent = new Map();
  const index = (n, p) => { byId.set(n.id, n); parent.set(n.id, p); for (const c of n.children || []) index(c, n); };
  const unindex = (n) => { byId.delete(n.id); parent.delete(n.id); for (const c of n.children || []) unindex(c); };
  root = clone(root);
  index(root, null);
  for (const op of delta.ops || []) {
    if (op.op === "replaceRoot") {
      root = clone(op.node);
      byId.clear(); parent.clear();
      index(root, null);
    } else if (op.op === "removeNode") {
      const n = byId.get(op.id);
      const p = parent.get(op.id);
      if (!n || !p) throw new Error("delta removes unknown node " + op.id);
      p.children.splice(p.children.indexOf(n), 1);
      unindex(n);
    } else if (op.op === "addNode") {
      const p = byId.get(op.parentId);
      if (!p) throw new Error("delta adds under unknown node " + op.parentId);
      const n = clone(op.node);
      p.children = p.children || [];
      p.children.splice(Math.min(op.index, p.children.length), 0, n);
      index(n, p);
    } else if (op.op === "updateProps") {
      const n = byId.get(op.id);
      if (!n) throw new Error("delta updates unknown node " + op.id);
      n.props = op.props;
    } else if (op.op === "updateTask") {
      const n = byId.get(op.id);
      if (!n) throw new Error("delta updates unknown node " + op.id);
      n.task = op.task;
    }
  }
  return root;
}

/** The workflow node id a tree node stands for (tasks, approvals, waits, timers). */
export function nodeKey(n) {
  if (n.task && n.task.nodeId) return n.task.nodeId;
  const id = n.props && n.props.id;
  return typeof id === "string" ? id : null;
}

/**
 * The newest attempt of each node (any iteration) as it stood at time `at` (ms; omit for now):
 * attempts started later are left out, and one that finished later shows as in progress.
 */
export function latestAttempts(attempts, at) {
  const latest = new Map();
  for (const a of attempts) {
    if (at !== undefined && a.startedAtMs > at) continue;
    const seen = latest.get(a.nodeId);
    const newer = !seen || a.iteration > seen.iteration || (a.iteration === seen.iteration && a.attempt > seen.attempt);
    if (!newer) continue;
    const view = Object.assign({}, a);
    if (at !== undefined && a.finishedAtMs && a.finishedAtMs > at) { view.state = "in-progress"; view.finishedAtMs = null; }
    latest.set(a.nodeId, view);
  }
  return latest;
}

/** Token usage recorded in an attempt's metadata, as "in 274 · out 40", or "". */
export function tokens(a) {
  const meta = parseJson(a && a.metaJson, null);
  const u = meta && meta.usage;
  if (!u) return "";
  const parts = [];
  if (Number.isFinite(u.inputTokens)) parts.push("in " + u.inputTokens);
  if (Number.isFinite(u.outputTokens)) parts.push("out " + u.outputTokens);
  return parts.length ? parts.join(" · ") + " tokens" : "";
}

/**
 * The tree as nested lists. `states` maps node ids to their newest attempt; `onPick(nodeId)`
 * opens a node's details.
 */
export function renderTree(root, states, counts, onPick, picked) {
  const draw = (n) => {
    const key = nodeKey(n);
    const a = key ? states.get(key) : null;
    const state = key ? (a ? a.state : "pending") : null;
    const label = (n.task && n.task.label) || (n.props && typeof n.props.title === "string" && n.props.title) || key || n.name;
    const head = [
      h("span", { class: "kind", text: n.type }), " ",
      key ? h("button", { type: "button", class: "link node-pick", "aria-pressed": picked === key ? "true" : "false", onclick: () => onPick(key), text: label }) : h("span", { class: "name", text: n.name }),
    ];
    if (state) head.push(" ", h("span", { class: "state status-" + state, text: state }));
    if (a) {
      const bits = [];
      const tries = counts.get(key) || a.attempt;
      if (tries > 1) bits.push(tries + " attempts");
      if (a.finishedAtMs && a.startedAtMs) bits.push(fmtMs(a.finishedAtMs - a.startedAtMs));
      const t = tokens(a);
      if (t) bits.push(t);
      if (bits.length) head.push(" ", h("span", { class: "muted", text: bits.join(", ") }));
    }
    const kids = (n.children || []).map(draw);
    return h("li", { "data-node-id": key || undefined, "data-type": n.type, "data-state": state || undefined },
      h("div", { class: "node" }, head),
      kids.length ? h("ul", {}, kids) : null);
  };
  return h("ul", { class: "tree" }, root ? draw(root) : null);
}
