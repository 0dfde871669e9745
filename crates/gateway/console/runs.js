// The runs list: filtered and searched on the server, paged by position (the last row of a page
// is where the next one starts), and kept live from events without re-reading the whole list.

import { session, page, h, show, failure, fmtTime, runDuration, debounce, STATUSES } from "./core.js";

const PAGE = 50;

export function runsPage() {
  const live = session.live;
  const filter = h("select", { id: "status-filter" }, h("option", { value: "", text: "all" }), STATUSES.map((s) => h("option", { value: s, text: s })));
  const wfFilter = h("select", { id: "workflow-filter" }, h("option", { value: "", text: "all" }));
  const search = h("input", { id: "run-search", type: "search", placeholder: "run id or its start", autocomplete: "off" });
  const body = h("tbody");
  const table = h("table", { id: "runs" },
    h("caption", { class: "sr-only", text: "Runs, newest first" }),
    h("thead", {}, h("tr", {}, ["Run", "Workflow", "Status", "Started", "Duration"].map((t) => h("th", { scope: "col", text: t })))),
    body);
  const msg = h("p", { class: "muted", role: "status" });
  const newer = h("button", { id: "newer", type: "button", class: "secondary", text: "← Newer" });
  const older = h("button", { id: "older", type: "button", class: "secondary", text: "Older →" });
  const where = h("span", { id: "page-no", class: "muted" });
  // positions of the pages before this one; empty on the first page
  const cursors = [];
  let rows = [];

  const row = (r) => h("tr", { "data-run-id": r.runId },
    h("td", {}, h("a", { href: "#/runs/" + encodeURIComponent(r.runId), text: r.runId })),
    h("td", { text: r.workflowKey || r.workflowName }),
    h("td", { class: "status status-" + r.status, "data-field": "status", text: r.status }),
    h("td", { text: fmtTime(r.createdAtMs) }),
    h("td", { text: runDuration(r) }));
  const render = () => {
    body.replaceChildren(...rows.map(row));
    msg.textContent = rows.length ? "" : "no runs";
    newer.disabled = cursors.length === 0;
    older.disabled = rows.length < PAGE;
    where.textContent = "page " + (cursors.length + 1);
  };
  const params = () => {
    const p = { limit: PAGE };
    if (filter.value) p.status = filter.value;
    if (wfFilter.value) p.workflow = wfFilter.value;
    const q = search.value.trim();
    if (q) p.runIdPrefix = q;
    const at = cursors[cursors.length - 1];
    if (at) { p.beforeCreatedAtMs = at.createdAtMs; p.beforeRunId = at.runId; }
    return p;
  };
  const load = async () => {
    try {
      rows = await live.send("runs.list", params());
      render();
    } catch (e) { msg.replaceChildren(failure(e)); }
  };
  const restart = () => { cursors.length = 0; load(); };
  newer.addEventListener("click", () => { cursors.pop(); load(); });
  older.addEventListener("click", () => {
    const last = rows[rows.length - 1];
    if (!last) return;
    cursors.push({ createdAtMs: last.createdAtMs, runId: last.runId });
    load();
  });
  filter.addEventListener("change", restart);
  wfFilter.addEventListener("change", restart);
  search.addEventListener("input", debounce(restart, 250));

  // Live: statuses change in place from event payloads; a run this page has not seen only
  // matters on the first page, which is then read again (at most a few times a second).
  const reloadFirst = debounce(() => { if (cursors.length === 0) load(); }, 400);
  const setStatus = (runId, status) => {
    const r = rows.find((x) => x.runId === runId);
    if (!r) { reloadFirst(); return; }
    if (!status || r.status === status) return;
    r.status = status;
    if (filter.value && filter.value !== status && !(filter.value === "running" && status === "continued")) { reloadFirst(); return; }
    const tr = body.querySelector('tr[data-run-id="' + CSS.escape(runId) + '"] [data-field="status"]');
    if (tr) { tr.textContent = status; tr.className = "status status-" + status; }
  };
  page.listeners.add((event, p) => {
    if (!p || !p.runId) return;
    if (event === "run.completed") { const r = rows.find((x) => x.runId === p.runId); if (r) r.finishedAtMs = Date.now(); setStatus(p.runId, p.status); }
    else if (event === "run.waiting") setStatus(p.runId, p.status);
    else if (event === "node.started" || event === "approval.decided") setStatus(p.runId, "running");
    else if (event.startsWith("node.") || event.startsWith("run.")) setStatus(p.runId, null);
  });

  show("Runs", h("h1", { text: "Runs" }),
    h("div", { class: "filters" },
      h("div", {}, h("label", { for: "status-filter", text: "Status" }), filter),
      h("div", {}, h("label", { for: "workflow-filter", text: "Workflow" }), wfFilter),
      h("div", {}, h("label", { for: "run-search", text: "Search" }), search)),
    h("div", { class: "table-wrap" }, table), msg,
    h("div", { class: "pager" }, newer, where, older));
  live.send("workflows.list", {}).then((r) => {
    for (const w of (r && r.workflows) || []) wfFilter.append(h("option", { value: w.key, text: w.key }));
  }, () => {});
  load();
}
