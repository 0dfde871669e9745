// Start a run: pick a served workflow, fill a form made from its input JSON Schema, see what is
// wrong in place, and land on the new run.

import { session, h, show, failure, denied, actOn } from "./core.js";

export async function startPage(params) {
  const select = h("select", { id: "workflow" });
  const fields = h("div");
  const msg = h("p", { role: "status", class: "muted" });
  const reason = denied("execute");
  const submit = h("button", { type: "submit", disabled: !!reason, title: reason || undefined, text: "Start" });
  let workflows = [];
  const form = h("form", { id: "start-form", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const wf = workflows.find((w) => w.key === select.value);
    if (!wf) return;
    const input = collect(wf.inputSchema, fields);
    if (!input) { const bad = fields.querySelector('[aria-invalid="true"]'); if (bad) bad.focus(); return; }
    try {
      const r = await actOn("runs.create", { workflow: wf.key, input });
      location.hash = "#/runs/" + encodeURIComponent(r.runId);
    } catch (e) { msg.replaceChildren(failure(e)); }
  } },
  h("div", { class: "field" }, h("label", { for: "workflow", text: "Workflow" }), select),
  fields, reason ? h("p", { class: "muted", text: "Starting runs is unavailable: " + reason + "." }) : null, submit);
  show("Start a run", h("h1", { text: "Start a run" }), form, msg);
  try {
    workflows = (await session.live.send("workflows.list", {})).workflows || [];
  } catch (e) { msg.replaceChildren(failure(e)); return; }
  select.replaceChildren(...workflows.map((w) => h("option", { value: w.key, text: w.key + (w.description ? " — " + w.description : "") })));
  const want = params && params.get("workflow");
  if (want && workflows.some((w) => w.key === want)) select.value = want;
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
    const described = "err-" + name + (p && p.description ? " desc-" + name : "");
    let input;
    if (type === "boolean") input = h("input", { id, name, type: "checkbox" });
    else if (type === "object" || type === "array") input = h("textarea", { id, name, rows: 3, placeholder: type === "array" ? "[ ]" : "{ }", "aria-describedby": described });
    else if (Array.isArray(p && p.enum)) input = h("select", { id, name, "aria-describedby": described }, h("option", { value: "", text: "" }), p.enum.map((v) => h("option", { value: String(v), text: String(v) })));
    else input = h("input", { id, name, type: type === "number" || type === "integer" ? "number" : "text", "aria-describedby": described, "aria-required": required.has(name) ? "true" : undefined });
    return h("div", { class: "field" },
      h("label", { for: id, text: name + (required.has(name) ? " (required)" : "") }),
      p && p.description ? h("p", { class: "muted", id: "desc-" + name, text: p.description }) : null,
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
    el.removeAttribute("aria-invalid");
    const bad = (text) => { err.textContent = text; el.setAttribute("aria-invalid", "true"); ok = false; };
    const type = p && p.type;
    if (type === "boolean") { input[name] = el.checked; continue; }
    const raw = el.value.trim();
    if (!raw) {
      if (required.has(name)) bad(name + " is required");
      continue;
    }
    if (type === "number" || type === "integer") {
      const n = Number(raw);
      if (!Number.isFinite(n) || (type === "integer" && !Number.isInteger(n))) { bad(name + " must be " + (type === "integer" ? "an integer" : "a number")); continue; }
      input[name] = n;
    } else if (type === "object" || type === "array") {
      let v;
      try { v = JSON.parse(raw); } catch { bad(name + " must be JSON"); continue; }
      if (type === "array" ? !Array.isArray(v) : (v === null || typeof v !== "object" || Array.isArray(v))) { bad(name + " must be " + (type === "array" ? "a JSON array" : "a JSON object")); continue; }
      input[name] = v;
    } else input[name] = raw;
  }
  return ok ? input : null;
}
