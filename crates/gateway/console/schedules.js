// Schedules: list cron schedules, add one, enable or disable it, remove it, or start a run now.

import { session, h, show, failure, denied, actOn, fmtTime, debounce, page } from "./core.js";

export async function schedulesPage() {
  const live = session.live;
  const admin = denied("admin");
  const exec = denied("execute");
  const body = h("tbody");
  const msg = h("p", { role: "status", class: "muted", id: "cron-note" });
  const table = h("table", { id: "schedules" },
    h("thead", {}, h("tr", {}, ["Schedule", "Workflow", "Pattern", "Enabled", "Next", "Last", ""].map((t) => h("th", { scope: "col", text: t })))),
    body);

  const act = (label, cls, reason, fn) => h("button", { type: "button", class: cls, disabled: !!reason, title: reason || undefined, onclick: async () => {
    try { await fn(); } catch (e) { msg.replaceChildren(failure(e)); }
  } }, label);

  const load = async () => {
    try {
      const rows = await live.send("cron.list", {});
      body.replaceChildren(...rows.map((c) => h("tr", { "data-cron-id": c.cronId },
        h("td", {}, h("code", { text: c.cronId })),
        h("td", { text: c.workflow }),
        h("td", {}, h("code", { text: c.pattern })),
        h("td", { "data-field": "enabled", text: c.enabled ? "yes" : "no" }),
        h("td", { text: c.enabled ? fmtTime(c.nextRunAtMs) : "–" }),
        h("td", {}, fmtTime(c.lastRunAtMs), c.errorJson ? h("div", { class: "error", text: String(c.errorJson) }) : null),
        h("td", { class: "row-actions" },
          act("Run now", "secondary trigger", exec, async () => {
            const r = await actOn("cron.trigger", { cronId: c.cronId });
            msg.replaceChildren("started ", h("a", { href: "#/runs/" + encodeURIComponent(r.runId), text: r.runId }));
            load();
          }),
          act(c.enabled ? "Disable" : "Enable", "secondary toggle", admin, async () => {
            const p = { cronId: c.cronId, workflow: c.workflow, pattern: c.pattern, enabled: !c.enabled };
            if (c.input && Object.keys(c.input).length) p.input = c.input;
            await actOn("cron.add", p);
            msg.textContent = (c.enabled ? "disabled " : "enabled ") + c.cronId;
            load();
          }),
          act("Remove", "danger remove", admin, async () => {
            if (!window.confirm("Remove the schedule " + c.cronId + "? Runs it started stay.")) return;
            await actOn("cron.remove", { cronId: c.cronId });
            msg.textContent = "removed " + c.cronId;
            load();
          })))));
      if (!rows.length) body.replaceChildren(h("tr", {}, h("td", { colspan: "7", class: "muted", text: "no schedules" })));
    } catch (e) { msg.replaceChildren(failure(e)); }
  };

  const wf = h("select", { id: "cron-workflow" });
  const pattern = h("input", { id: "cron-pattern", type: "text", placeholder: "0 8 * * 1-5", autocomplete: "off", "aria-describedby": "cron-pattern-help" });
  const cronId = h("input", { id: "cron-id", type: "text", autocomplete: "off" });
  const input = h("textarea", { id: "cron-input", rows: 3, placeholder: "{ }" });
  const enabled = h("input", { id: "cron-enabled", type: "checkbox", checked: true });
  const form = h("form", { id: "cron-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const p = { workflow: wf.value, pattern: pattern.value.trim(), enabled: enabled.checked };
    if (cronId.value.trim()) p.cronId = cronId.value.trim();
    if (input.value.trim()) {
      try { p.input = JSON.parse(input.value); } catch { msg.replaceChildren(failure(new Error("input must be JSON"))); input.focus(); return; }
    }
    try {
      const r = await actOn("cron.add", p);
      msg.textContent = "saved " + r.cronId + "; next run " + fmtTime(r.nextRunAtMs);
      load();
    } catch (e) { msg.replaceChildren(failure(e)); }
  } },
  h("div", { class: "field" }, h("label", { for: "cron-workflow", text: "Workflow" }), wf),
  h("div", { class: "field" }, h("label", { for: "cron-pattern", text: "Pattern" }), pattern,
    h("p", { id: "cron-pattern-help", class: "muted", text: "Five or six cron fields (minute hour day month weekday), or @daily, @hourly…" })),
  h("div", { class: "field" }, h("label", { for: "cron-id", text: "Id (optional; an existing id is replaced)" }), cronId),
  h("div", { class: "field" }, h("label", { for: "cron-input", text: "Input (JSON, optional)" }), input),
  h("div", { class: "field check" }, enabled, h("label", { for: "cron-enabled", text: "Enabled" })),
  admin ? h("p", { class: "muted", text: "Adding schedules is unavailable: " + admin + "." }) : null,
  h("button", { type: "submit", disabled: !!admin, title: admin || undefined, text: "Save schedule" }));

  const soon = debounce(load, 300);
  page.listeners.add((event) => { if (event === "cron.triggered") soon(); });
  show("Schedules", h("h1", { text: "Schedules" }), h("div", { class: "table-wrap" }, table), msg,
    h("h2", { text: "Add a schedule" }), form);
  live.send("workflows.list", {}).then((r) => {
    wf.replaceChildren(...((r && r.workflows) || []).map((w) => h("option", { value: w.key, text: w.key })));
  }, (e) => msg.replaceChildren(failure(e)));
  load();
}
