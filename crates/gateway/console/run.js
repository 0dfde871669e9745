// One run: its facts, the workflow tree as it renders (a DevTools stream on a socket of its
// own), node details, the frame timeline with fork and rewind, live task output, and actions.

import { Conn, session, page, token, h, show, failure, fmtTime, fmtMs, runDuration, json, parseJson, denied, actionButton, actOn, debounce } from "./core.js";
import { applyDelta, renderTree, latestAttempts, tokens } from "./tree.js";

const FRAMES_SHOWN = 30;

export async function runPage(runId) {
  const live = session.live;
  const status = h("span", { "data-field": "status" });
  const facts = h("dl", { id: "facts" });
  const inputView = h("pre", { id: "input", class: "small", "aria-label": "Input" });
  const note = h("p", { role: "status", class: "muted", id: "run-note" });
  const waiting = h("ul", { id: "pending", class: "plain" });
  const treeBox = h("div", { id: "tree", "aria-live": "off" });
  const frameView = h("p", { id: "frame-view", class: "muted" });
  const detail = h("section", { id: "node", "aria-label": "Node details", hidden: true });
  const frameList = h("ol", { id: "frames", class: "frames", reversed: true });
  const frameNo = h("input", { id: "frame-no", type: "number", min: "0", step: "1", inputmode: "numeric" });
  const output = h("pre", { id: "output", "aria-label": "Task output" });
  const exec = denied("execute");
  const dialog = h("dialog", { id: "rewind-dialog", "aria-labelledby": "rewind-title" });

  let run = null;
  let attempts = [];
  let liveTree = null;
  let liveFrame = 0;
  let viewing = null; // {frameNo, createdAtMs, root} while an older frame is shown
  let picked = null;
  let lastSeq = -1;

  // ---- actions
  const actions = h("div", { class: "actions" },
    actionButton({ id: "cancel", class: "secondary" }, "Cancel", exec, () => actOn("runs.cancel", { runId }), note),
    actionButton({ id: "resume", class: "secondary" }, "Resume", exec, () => actOn("runs.resume", { runId }), note),
    actionButton({ id: "rerun", class: "secondary" }, "Rerun", exec, async () => {
      const r = await actOn("runs.rerun", { runId });
      location.hash = "#/runs/" + encodeURIComponent(r.runId);
      return false;
    }, note),
    h("a", { id: "signal-link", class: "button-link", href: "#/signals?run=" + encodeURIComponent(runId), hidden: true, text: "Send a signal" }));

  // ---- frame timeline
  const backLive = h("button", { id: "live", type: "button", class: "secondary", hidden: true, onclick: () => { viewing = null; drawTree(); }, text: "Back to live" });
  const fork = actionButton({ id: "fork", hidden: true }, "Fork from this frame", exec, async () => {
    const r = await actOn("runs.fork", { runId, frameNo: viewing.frameNo });
    location.hash = "#/runs/" + encodeURIComponent(r.runId);
    return false;
  }, note);
  const rewind = h("button", { id: "rewind", type: "button", class: "danger", hidden: true, onclick: () => confirmRewind(), text: "Rewind to this frame" });
  const showFrame = h("button", { id: "show-frame", type: "button", class: "secondary", onclick: () => pickFrame(Number(frameNo.value)), text: "Show" });

  show("Run " + runId, h("section", { id: "run" },
    h("h1", {}, "Run ", h("code", { text: runId })),
    h("p", {}, "Status: ", status), facts,
    h("details", {}, h("summary", { text: "Input" }), inputView),
    actions, note, waiting,
    h("div", { class: "columns" },
      h("section", { "aria-labelledby": "tree-h" },
        h("h2", { id: "tree-h", text: "Workflow tree" }), frameView, treeBox,
        h("div", { class: "actions" }, backLive, fork, rewind)),
      detail),
    h("section", { "aria-labelledby": "frames-h" },
      h("h2", { id: "frames-h", text: "Frames" }),
      h("div", { class: "inline" }, h("label", { for: "frame-no", text: "Frame number" }), frameNo, showFrame),
      frameList),
    h("h2", { text: "Task output" }), output, dialog));

  // ---- tree drawing: live, or an older frame with states as they were then
  const counts = () => {
    const c = new Map();
    for (const a of attempts) c.set(a.nodeId, (c.get(a.nodeId) || 0) + 1);
    return c;
  };
  function drawTree() {
    const shown = viewing ? viewing.root : liveTree;
    const states = viewing ? latestAttempts(attempts, viewing.createdAtMs) : liveStates();
    treeBox.replaceChildren(renderTree(shown, states, counts(), pickNode, picked));
    const old = viewing && viewing.frameNo !== liveFrame;
    frameView.textContent = viewing ? "Frame " + viewing.frameNo + " of " + liveFrame + (old ? " (as it was; the run goes on)" : "") : "Live (frame " + liveFrame + ")";
    backLive.hidden = !viewing;
    fork.hidden = !old || viewing.frameNo < 1;
    rewind.hidden = !old;
    const why = exec || ownerReason();
    rewind.disabled = !!why;
    rewind.title = why || "";
    for (const li of frameList.querySelectorAll("button[data-frame-no]")) li.setAttribute("aria-pressed", viewing && Number(li.dataset.frameNo) === viewing.frameNo ? "true" : "false");
  }
  /** Each node's newest attempt, with the node's own state (approvals and waits have none). */
  function liveStates() {
    const states = latestAttempts(attempts);
    const newest = new Map();
    for (const n of (run && run.nodes) || []) {
      const seen = newest.get(n.nodeId);
      if (!seen || n.iteration >= seen.iteration) newest.set(n.nodeId, n);
    }
    for (const [id, n] of newest) {
      const a = states.get(id);
      states.set(id, a ? Object.assign({}, a, { state: n.state }) : { state: n.state, attempt: 0 });
    }
    return states;
  }
  function ownerReason() {
    if (!run || session.role && session.role.toLowerCase() === "admin") return null;
    const owner = (parseJson(run.configJson, {}) || {}).auth;
    const who = owner && owner.triggeredBy;
    // without a user id the gateway decides (with authentication off anyone may rewind)
    if (session.userId && who && who !== session.userId) return "only the run's owner (" + who + ") or an admin may rewind it";
    return null;
  }

  async function pickFrame(n) {
    if (!Number.isInteger(n) || n < 0) { note.replaceChildren(failure(new Error("a frame number is a whole number from 0"))); return; }
    try {
      const [snap, frame] = await Promise.all([
        live.send("getDevToolsSnapshot", { runId, frameNo: n }),
        n > 0 ? live.send("frames.get", { runId, frameNo: n }) : Promise.resolve(null),
      ]);
      viewing = { frameNo: snap.frameNo, createdAtMs: frame ? frame.createdAtMs : 0, root: snap.root };
      frameNo.value = String(snap.frameNo);
      drawTree();
    } catch (e) { note.replaceChildren(failure(e)); }
  }

  async function confirmRewind() {
    const target = viewing;
    if (!target) return;
    // what the rewind would delete, by the gateway's own rule (nothing changes yet)
    let plan;
    try { plan = await actOn("jumpToFrame", { runId, frameNo: target.frameNo, preview: true }); }
    catch (e) { note.replaceChildren(failure(e)); return; }
    const lost = plan.attempts || [];
    const nodes = [...new Set(lost.map((a) => a.nodeId))];
    const frames = plan.deletedFrames;
    const last = plan.latestFrameNo;
    const go = h("button", { id: "rewind-confirm", type: "button", class: "danger", text: "Rewind" });
    const stop = h("button", { id: "rewind-cancel", type: "button", class: "secondary", text: "Keep the run as it is" });
    dialog.replaceChildren(
      h("h2", { id: "rewind-title", text: "Rewind to frame " + target.frameNo + "?" }),
      h("p", { id: "rewind-what", text: "This deletes " + frames + " frame" + (frames === 1 ? "" : "s") + " (" + (target.frameNo + 1) + "–" + last + ") and " + lost.length + " attempt" + (lost.length === 1 ? "" : "s") + (nodes.length ? " of " + nodes.join(", ") : "") + ", with their outputs. The run then continues from frame " + target.frameNo + ". This cannot be undone; a fork keeps the history instead." }),
      h("div", { class: "actions" }, stop, go));
    stop.addEventListener("click", () => dialog.close());
    go.addEventListener("click", async () => {
      dialog.close();
      try {
        const r = await actOn("jumpToFrame", { runId, frameNo: target.frameNo, confirm: true });
        note.textContent = "rewound to frame " + r.newFrameNo + ": " + r.deletedFrames + " frames and " + r.deletedAttempts + " attempts deleted";
        viewing = null;
        approvalsStale = true;
        refresh();
        loadFrames();
      } catch (e) { note.replaceChildren(failure(e)); }
    });
    dialog.showModal();
    stop.focus();
  }

  // ---- node details
  async function pickNode(nodeId) {
    picked = nodeId;
    drawTree();
    detail.hidden = false;
    const mine = attempts.filter((a) => a.nodeId === nodeId);
    const last = mine[mine.length - 1];
    const iteration = last ? last.iteration : 0;
    const body = h("div");
    detail.replaceChildren(h("h2", {}, "Node ", h("code", { text: nodeId })), body);
    const rows = mine.map((a) => h("tr", {},
      h("td", { text: String(a.iteration) }), h("td", { text: String(a.attempt) }),
      h("td", { class: "status-" + a.state, text: a.state }),
      h("td", { text: fmtTime(a.startedAtMs) }),
      h("td", { text: a.finishedAtMs ? fmtMs(a.finishedAtMs - a.startedAtMs) : "" }),
      h("td", { text: tokens(a) })));
    body.append(h("h3", { text: "Attempts" }), mine.length
      ? h("div", { class: "table-wrap" }, h("table", { id: "attempts" },
        h("thead", {}, h("tr", {}, ["Iteration", "Attempt", "State", "Started", "Took", "Tokens"].map((t) => h("th", { scope: "col", text: t })))),
        h("tbody", {}, rows)))
      : h("p", { class: "muted", text: "no attempts yet" }));
    const errors = mine.filter((a) => a.errorJson).map((a) => h("p", { class: "error", text: "attempt " + a.attempt + ": " + errorText(a.errorJson) }));
    if (errors.length) body.append(h("h3", { text: "Errors" }), ...errors);
    try {
      const out = await live.send("getNodeOutput", { runId, nodeId, iteration });
      body.append(h("h3", { text: "Output (" + out.status + ")" }),
        h("pre", { id: "node-output", class: "small", text: out.row === null || out.row === undefined ? "–" : json(out.row) }));
      const fields = (out.schema && out.schema.fields) || [];
      if (fields.length) {
        body.append(h("h3", { text: "Output schema" }), h("div", { class: "table-wrap" }, h("table", { id: "schema" },
          h("thead", {}, h("tr", {}, ["Field", "Type", "Required"].map((t) => h("th", { scope: "col", text: t })))),
          h("tbody", {}, fields.map((f) => h("tr", {},
            h("td", { text: f.name }),
            h("td", { text: f.type + (f.nullable ? " or null" : "") + (f.enum ? " (" + f.enum.join(", ") + ")" : "") }),
            h("td", { text: f.optional ? "no" : "yes" })))))));
      }
    } catch (e) {
      // a task without an output schema has no output table; a finished run still reports
      // what each node produced
      const out = run && run.output && typeof run.output === "object" ? run.output[nodeId] : undefined;
      if (e.code === "NodeHasNoOutput" && out !== undefined) {
        body.append(h("h3", { text: "Output (no schema)" }), h("pre", { id: "node-output", class: "small", text: json(out) }));
      } else {
        body.append(h("h3", { text: "Output" }), h("p", { class: "muted", text: (e.code ? "[" + e.code + "] " : "") + e.message }));
      }
    }
  }

  // ---- facts, attempts and approvals, read again after the run's events
  // approvals.list covers every run, so it is read again only when an approval changed
  let approvals = [];
  let approvalsStale = true;
  async function refresh() {
    try {
      const readApprovals = approvalsStale;
      approvalsStale = false;
      const [r, a, pending] = await Promise.all([
        live.send("runs.get", { runId }),
        live.send("attempts.list", { runId }),
        readApprovals ? live.send("approvals.list", {}) : Promise.resolve(null),
      ]);
      if (pending) approvals = pending.filter((x) => x.runId === runId);
      run = r;
      attempts = a;
      status.textContent = r.status;
      status.className = "status-" + r.status;
      const started = r.startedAtMs || r.createdAtMs;
      facts.replaceChildren(...[
        h("dt", { text: "Workflow" }), h("dd", { text: r.workflowKey || r.workflowName }),
        r.parentRunId ? h("dt", { text: "Forked from" }) : null,
        r.parentRunId ? h("dd", {}, h("a", { href: "#/runs/" + encodeURIComponent(r.parentRunId), text: r.parentRunId })) : null,
        h("dt", { text: "Created" }), h("dd", { text: fmtTime(r.createdAtMs) }),
        h("dt", { text: "Started" }), h("dd", { text: fmtTime(started) }),
        h("dt", { text: "Finished" }), h("dd", { text: fmtTime(r.finishedAtMs) }),
        h("dt", { text: "Duration" }), h("dd", { text: runDuration(r) }),
        r.errorJson ? h("dt", { text: "Error" }) : null,
        r.errorJson ? h("dd", { class: "error", text: errorText(r.errorJson) }) : null,
      ].filter(Boolean));
      inputView.textContent = json(r.input === undefined ? {} : r.input);
      waiting.replaceChildren(...approvals.map((x) => h("li", { "data-node-id": x.nodeId },
        h("strong", { text: x.requestTitle || x.nodeId }), " (", x.nodeId, ") waits for a decision in ",
        h("a", { href: "#/approvals", text: "Approvals" }))));
      document.getElementById("signal-link").hidden = r.status !== "waiting-event";
      drawTree();
      if (picked) pickNode(picked);
    } catch (e) { note.replaceChildren(failure(e)); }
  }

  async function loadFrames() {
    try {
      const rows = await live.send("frames.list", { runId, limit: FRAMES_SHOWN });
      frameList.replaceChildren(...rows.map((f) => {
        const changes = (f.nodeChanges || []).map((c) => c.nodeId + (c.to ? " " + c.to : " gone")).join(", ");
        return h("li", {}, h("button", { type: "button", class: "link", "data-frame-no": f.frameNo, onclick: () => pickFrame(f.frameNo) }, "Frame " + f.frameNo),
          " ", h("span", { class: "muted", text: fmtTime(f.createdAtMs) + (changes ? " · " + changes : "") }));
      }));
      if (rows.length) frameNo.max = String(rows[0].frameNo);
      drawTree();
    } catch (e) { note.replaceChildren(failure(e)); }
  }

  // ---- live: run events on the shared connection, the tree on a connection of its own
  const refreshSoon = debounce(refresh, 120);
  const framesSoon = debounce(loadFrames, 300);
  const append = (p) => {
    if (typeof p.eventSeq === "number") {
      if (p.eventSeq <= lastSeq) return;
      lastSeq = p.eventSeq;
    }
    output.append(document.createTextNode(String(p.output ?? "")));
  };
  page.listeners.add((event, p) => {
    if (p.runId !== runId) return;
    if (event === "task.output") append(p);
    else {
      if (event.startsWith("approval.") || event === "run.completed" || event === "run.time_travel_jumped") approvalsStale = true;
      refreshSoon();
    }
  });

  const dv = new Conn((event, p) => {
    if (event !== "devtools.event" || p.runId !== runId || !p.event) return;
    try {
      if (p.event.kind === "snapshot") { liveTree = p.event.snapshot.root; liveFrame = p.event.snapshot.frameNo; }
      else if (p.event.kind === "delta") { liveTree = applyDelta(liveTree, p.event.delta); liveFrame = p.event.delta.seq; }
    } catch {
      dv.send("getDevToolsSnapshot", { runId }).then((s) => { liveTree = s.root; liveFrame = s.frameNo; drawTree(); }, () => {});
    }
    drawTree();
    framesSoon();
  });
  page.cleanups.push(() => dv.close());

  await refresh();
  loadFrames();
  dv.open(token(), { subscribe: [runId] })
    .then(() => dv.send("streamDevTools", { runId }))
    .catch((e) => note.replaceChildren(failure(e)));
  try {
    for (;;) {
      const pageOf = await live.send("runs.events", { runId, afterSeq: lastSeq, limit: 10000 });
      for (const e of pageOf.events) if (e.event === "task.output") append(e.payload);
      if (typeof pageOf.lastSeq === "number" && pageOf.lastSeq > lastSeq) lastSeq = pageOf.lastSeq;
      if (!pageOf.more) break;
    }
  } catch (e) { note.replaceChildren(failure(e)); }
}

function errorText(text) {
  const e = parseJson(text, null);
  if (!e || typeof e !== "object") return String(text);
  return (e.code ? "[" + e.code + "] " : "") + (e.message || text);
}
