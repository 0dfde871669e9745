// The approvals inbox: every pending approval across runs, with what to decide on, decided
// with a note; select and rank approvals show their choices.

import { session, page, h, show, failure, denied, actOn, json, debounce } from "./core.js";

export function approvalsPage() {
  const list = h("ul", { id: "approvals", class: "plain" });
  const msg = h("p", { role: "status", class: "muted" });
  const reason = denied("approve");
  const load = async () => {
    try {
      const items = await session.live.send("approvals.list", {});
      msg.textContent = items.length ? "" : "no approvals are waiting";
      list.replaceChildren(...items.map((a) => approvalItem(a, reason, msg)));
    } catch (e) { msg.replaceChildren(failure(e)); }
  };
  const soon = debounce(load, 150);
  page.listeners.add((event) => { if (event.startsWith("approval.") || event === "run.completed") soon(); });
  show("Approvals", h("h1", { text: "Approvals" }), reason ? h("p", { class: "muted", text: "You can see approvals but not decide them: " + reason + "." }) : null, msg, list);
  load();
}

function approvalItem(a, reason, msg) {
  const id = "note-" + a.runId + "-" + a.nodeId + "-" + a.iteration;
  const note = h("input", { class: "note", id, type: "text" });
  const mode = a.approvalMode || "gate";
  const options = a.options || [];
  let choice = null;
  const choiceId = "choice-" + a.runId + "-" + a.nodeId + "-" + a.iteration;
  if (mode === "select") {
    choice = h("select", { class: "choice", id: choiceId }, options.map((o) => h("option", { value: o.key, text: o.label + (o.summary ? " — " + o.summary : "") })));
  } else if (mode === "rank") {
    choice = h("input", { class: "choice", id: choiceId, type: "text", value: options.map((o) => o.key).join(",") });
  }
  const decide = async (approved) => {
    const params = { runId: a.runId, nodeId: a.nodeId, iteration: a.iteration, approved };
    if (note.value.trim()) params.note = note.value.trim();
    if (approved && mode === "select") params.decision = { selected: choice.value };
    if (approved && mode === "rank") params.decision = { ranked: choice.value.split(",").map((s) => s.trim()).filter(Boolean) };
    try { await actOn("approvals.decide", params); msg.textContent = (approved ? "approved " : "denied ") + a.nodeId; }
    catch (e) { msg.replaceChildren(failure(e)); }
  };
  const summary = a.requestSummary === null || a.requestSummary === undefined ? null
    : typeof a.requestSummary === "string" ? h("p", { class: "summary", text: a.requestSummary })
      : h("pre", { class: "small summary", text: json(a.requestSummary) });
  const choices = mode === "rank" && options.length
    ? h("ol", { class: "options" }, options.map((o) => h("li", {}, h("code", { text: o.key }), " ", o.label, o.summary ? h("span", { class: "muted", text: " — " + o.summary }) : null)))
    : null;
  return h("li", { "data-run-id": a.runId, "data-node-id": a.nodeId },
    h("h2", { class: "item-title" }, h("span", { text: a.requestTitle || a.nodeId })),
    h("p", { class: "muted" }, "Run ", h("a", { href: "#/runs/" + encodeURIComponent(a.runId), text: a.runId }), ", node ", h("code", { text: a.nodeId }),
      a.iteration ? ", iteration " + a.iteration : "", " · " + mode),
    summary, choices,
    choice ? h("div", { class: "field" }, h("label", { for: choiceId, text: mode === "select" ? "Choice" : "Order (keys, comma-separated)" }), choice) : null,
    h("div", { class: "field" }, h("label", { for: id, text: "Note" }), note),
    h("div", { class: "actions" },
      h("button", { type: "button", class: "approve", disabled: !!reason, title: reason || undefined, onclick: () => decide(true), text: "Approve" }),
      h("button", { type: "button", class: "deny secondary", disabled: !!reason, title: reason || undefined, onclick: () => decide(false), text: "Deny" })));
}
