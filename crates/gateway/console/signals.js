// Signals: the runs that wait for an event, and a form to send one, prefilled with the event
// name and correlation id the chosen run waits for.

import { session, h, show, failure, denied, actOn, parseJson, page, debounce } from "./core.js";

export async function signalsPage(params) {
  const live = session.live;
  const reason = denied("execute");
  const waitingList = h("ul", { id: "waiting-runs", class: "plain" });
  const runId = h("input", { id: "sig-run", name: "runId", type: "text", autocomplete: "off", required: true });
  const name = h("input", { id: "sig-name", name: "signalName", type: "text", autocomplete: "off", required: true });
  const corr = h("input", { id: "sig-corr", name: "correlationId", type: "text", autocomplete: "off" });
  const data = h("textarea", { id: "sig-data", name: "data", rows: 4, "aria-describedby": "sig-data-err" });
  const dataErr = h("p", { id: "sig-data-err", class: "error", role: "alert" });
  const msg = h("p", { role: "status", class: "muted", id: "sig-note" });
  const submit = h("button", { type: "submit", disabled: !!reason, title: reason || undefined, text: "Send" });
  data.value = "{}";

  const form = h("form", { id: "signal-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    dataErr.textContent = "";
    let payload;
    try { payload = data.value.trim() ? JSON.parse(data.value) : {}; } catch { dataErr.textContent = "data must be JSON"; data.focus(); return; }
    const p = { runId: runId.value.trim(), signalName: name.value.trim(), data: payload };
    if (corr.value.trim()) p.correlationId = corr.value.trim();
    if (!p.runId || !p.signalName) { msg.replaceChildren(failure(new Error("a run id and a signal name are needed"))); return; }
    try {
      const r = await actOn("signals.send", p);
      msg.replaceChildren("sent ", h("code", { text: r.signalName }), " as signal " + r.seq + " of ", h("a", { href: "#/runs/" + encodeURIComponent(r.runId), text: r.runId }));
    } catch (e) { msg.replaceChildren(failure(e)); }
  } },
  h("div", { class: "field" }, h("label", { for: "sig-run", text: "Run id" }), runId),
  h("div", { class: "field" }, h("label", { for: "sig-name", text: "Signal name" }), name),
  h("div", { class: "field" }, h("label", { for: "sig-corr", text: "Correlation id (optional)" }), corr),
  h("div", { class: "field" }, h("label", { for: "sig-data", text: "Data (JSON)" }), data, dataErr),
  reason ? h("p", { class: "muted", text: "Sending signals is unavailable: " + reason + "." }) : null,
  submit);

  /** Fills the form from what the run's waiting node listens for. */
  const prefill = async (id) => {
    runId.value = id;
    try {
      const run = await live.send("runs.get", { runId: id });
      const blocked = run.runState && run.runState.blocked;
      if (!blocked || blocked.kind !== "event") { msg.textContent = "run " + id + " is not waiting for an event"; return; }
      const tries = await live.send("attempts.list", { runId: id, nodeId: blocked.nodeId });
      const meta = parseJson(tries[0] && tries[0].metaJson, {}) || {};
      const wait = meta.waitForEvent || {};
      name.value = wait.signalName || "";
      corr.value = wait.correlationId || "";
      msg.textContent = "prefilled from node " + blocked.nodeId + " of run " + id;
    } catch (e) { msg.replaceChildren(failure(e)); }
  };

  const load = async () => {
    try {
      const runs = await live.send("runs.list", { status: "waiting-event", limit: 100 });
      waitingList.replaceChildren(...runs.map((r) => h("li", { "data-run-id": r.runId },
        h("a", { href: "#/runs/" + encodeURIComponent(r.runId), text: r.runId }), " ",
        h("span", { class: "muted", text: r.workflowKey || r.workflowName }), " ",
        h("button", { type: "button", class: "secondary use-run", onclick: () => prefill(r.runId), text: "Use this run" }))));
      if (!runs.length) waitingList.replaceChildren(h("li", { class: "muted", text: "no run is waiting for an event" }));
    } catch (e) { msg.replaceChildren(failure(e)); }
  };
  const soon = debounce(load, 300);
  page.listeners.add((event) => { if (event === "run.waiting" || event === "run.completed") soon(); });

  show("Signals", h("h1", { text: "Signals" }),
    h("h2", { text: "Runs waiting for an event" }), waitingList,
    h("h2", { text: "Send a signal" }), form, msg);
  await load();
  const want = params && params.get("run");
  if (want) prefill(want);
}
