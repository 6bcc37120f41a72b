// wantrainer ui: the page. Plain JavaScript, no framework, nothing loaded from the network.
"use strict";

const state = { schema: null, info: null, path: null, data: {}, textMode: false, runId: null, next: 0,
                validateTimer: null, watchTimer: null, runTimer: null, media: {} };
const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
};

async function api(method, url, body) {
  const res = await fetch(url, { method, headers: body ? { "Content-Type": "application/json" } : {},
                                 body: body ? JSON.stringify(body) : undefined, credentials: "same-origin" });
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) { const err = new Error(data.error || res.statusText); err.status = res.status; err.body = data; throw err; }
  return data;
}

// ---- 1. configs --------------------------------------------------------------------------------------------
async function loadConfigs() {
  const { configs } = await api("GET", "api/configs");
  const list = $("#configs"); list.replaceChildren();
  for (const c of configs) {
    list.append(el("li", { "data-path": c.path, class: c.path === state.path ? "open" : "", title: c.path,
                           onclick: () => openConfig(c.path) }, c.name));
  }
}

async function openConfig(path) {
  const cfg = await api("GET", "api/config?path=" + encodeURIComponent(path));
  state.path = cfg.path; state.data = cfg.data || {}; state.runId = null;
  $("#current").textContent = cfg.path;
  $("#toml-text").value = cfg.text;
  $("#save").disabled = false;
  if (cfg.data === null) setTextMode(true);
  for (const li of document.querySelectorAll("#configs li")) li.classList.toggle("open", li.dataset.path === cfg.path);
  renderForm(); showVerdict(cfg); startWatch();
}

// ---- 2. the form, generated from the schema ----------------------------------------------------------------
function getAt(path) { let v = state.data; for (const p of path) { if (v == null) return undefined; v = v[p]; } return v; }
function setAt(path, value) {
  let v = state.data;
  for (let i = 0; i < path.length - 1; i++) {
    if (v[path[i]] == null) v[path[i]] = typeof path[i + 1] === "number" ? [] : {};
    v = v[path[i]];
  }
  const last = path[path.length - 1];
  if (value === undefined) { delete v[last]; pruneEmpty(path.slice(0, -1)); } else v[last] = value;
}
function pruneEmpty(path) {
  if (!path.length || typeof path[path.length - 1] === "number") return;
  const v = getAt(path);
  if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length === 0) setAt(path, undefined);
}
function keyName(path) {
  return path.map((p, i) => typeof p === "number" ? `[${p}]` : (i ? "." : "") + p).join("");
}
function show(v) { return typeof v === "string" ? v : JSON.stringify(v); }

function readInput(field, input) {
  if (field.kind === "bool") return input.value === "" ? undefined : input.value === "true";
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (field.kind === "select") { const c = field.choices.find((x) => String(x) === raw); return c === undefined ? raw : c; }
  if (field.kind === "int" || field.kind === "number") { const n = Number(raw); return Number.isFinite(n) ? n : raw; }
  if (field.kind === "value") { try { return JSON.parse(raw); } catch (e) { return raw; } }
  return raw;
}

function fieldRow(field, path) {
  const value = getAt(path);
  const id = "f-" + keyName(path).replace(/[^\w-]/g, "_");
  let input;
  if (field.kind === "select" || field.kind === "bool") {
    const choices = field.kind === "bool" ? [true, false] : field.choices;
    input = el("select", { id }, el("option", { value: "" }, `(default: ${show(field.default)})`),
               ...choices.map((c) => el("option", { value: String(c), selected: value !== undefined && String(value) === String(c) }, String(c))));
  } else {
    input = el("input", { id, type: "text", value: value === undefined ? "" : show(value),
                          placeholder: field.default === null || field.default === undefined ? "(unset)" : show(field.default) });
  }
  input.addEventListener("change", () => { setAt(path, readInput(field, input)); row.classList.toggle("set", getAt(path) !== undefined); scheduleValidate(); });
  const doc = [field.doc, `Type: ${field.type}` + (field.constraints ? `; ${field.constraints}` : "") +
               `; default: ${field.default === null ? "unset" : show(field.default)}`].filter(Boolean).join(" ");
  const row = el("div", { class: "field" + (value !== undefined ? " set" : ""), "data-key": keyName(path) },
                 el("label", { for: id }, field.key), input, el("div", { class: "doc" }, doc));
  return row;
}

function sectionBox(title, doc, rows, open) {
  return el("details", { class: "section", open }, el("summary", {}, title), doc ? el("div", { class: "muted" }, doc) : null, ...rows);
}

function tableList(title, doc, fields, basePath) {
  const items = getAt(basePath) || [];
  const box = sectionBox(title, doc, [], items.length > 0);
  items.forEach((_, i) => {
    const setFirst = fields.filter((f) => getAt([...basePath, i, f.key]) !== undefined);
    const rest = fields.filter((f) => getAt([...basePath, i, f.key]) === undefined);
    const more = el("details", {}, el("summary", {}, `other keys (${rest.length})`), ...rest.map((f) => fieldRow(f, [...basePath, i, f.key])));
    box.append(el("fieldset", { class: "item", "data-key": keyName([...basePath, i]) },
      el("legend", {}, `${title} #${i + 1} `, el("button", { type: "button", onclick: () => { items.splice(i, 1); if (!items.length) setAt(basePath, undefined); renderForm(); scheduleValidate(); } }, "remove")),
      ...setFirst.map((f) => fieldRow(f, [...basePath, i, f.key])), more));
  });
  box.append(el("button", { type: "button", onclick: () => { const list = getAt(basePath) || []; list.push({}); setAt(basePath, list); renderForm(); scheduleValidate(); } }, `add ${title}`));
  return box;
}

function renderForm() {
  const s = state.schema, form = $("#form");
  form.replaceChildren();
  for (const sec of s.sections) {
    const anySet = sec.fields.some((f) => getAt([f.key]) !== undefined);  // sections the file uses start open
    form.append(sectionBox(sec.title, null, sec.fields.map((f) => fieldRow(f, [f.key])), anySet));
  }
  form.append(tableList("[[sample_prompts]]", "prompts rendered during training and by `wantrainer sample`", s.sample_prompt, ["sample_prompts"]));
  const d = s.datasets;
  form.append(sectionBox("[datasets.general]", d.general.doc, s.dataset_entry.map((f) => fieldRow(f, ["datasets", "general", f.key])), false));
  form.append(tableList("[[datasets.train]]", d.train.doc, s.dataset_entry, ["datasets", "train"]));
  form.append(tableList("[[datasets.val]]", d.val.doc, s.dataset_entry, ["datasets", "val"]));
  form.append(sectionBox("[datasets.latent_cache]", d.latent_cache.doc, d.latent_cache.fields.map((f) => fieldRow(f, ["datasets", "latent_cache", f.key])), false));
  form.append(sectionBox("[datasets.text_encoder_cache]", d.text_encoder_cache.doc, d.text_encoder_cache.fields.map((f) => fieldRow(f, ["datasets", "text_encoder_cache", f.key])), false));
}

// ---- 3. validation, shown next to the field ----------------------------------------------------------------
function scheduleValidate() { clearTimeout(state.validateTimer); state.validateTimer = setTimeout(validateNow, 250); }
async function validateNow() {
  const body = state.textMode ? { path: state.path, text: $("#toml-text").value } : { path: state.path, data: state.data };
  try { showVerdict(await api("POST", "api/validate", body)); }
  catch (e) { showVerdict({ ok: false, schema_ok: false, problems: (e.body && e.body.problems) || [{ key: null, message: e.message }], notes: [] }); }
}

function fieldFor(key) {
  let k = key;
  while (k) {
    const node = document.querySelector(`[data-key="${CSS.escape(k)}"]`);
    if (node) return node;
    const cut = Math.max(k.lastIndexOf("."), k.lastIndexOf("["));
    k = cut > 0 ? k.slice(0, cut) : "";
  }
  return null;
}

function showVerdict(result) {
  for (const n of document.querySelectorAll(".field.invalid")) n.classList.remove("invalid");
  for (const n of document.querySelectorAll(".field .error, fieldset > .error")) n.remove();
  const list = $("#problems"); list.replaceChildren();
  for (const p of result.problems || []) {
    list.append(el("li", {}, p.message));
    const node = p.key ? fieldFor(p.key) : null;
    if (node) {
      node.classList.add("invalid");
      node.append(el("div", { class: "error" }, p.message));
      for (let d = node.parentElement; d; d = d.parentElement) if (d.tagName === "DETAILS") d.open = true;
    }
  }
  for (const n of result.notes || []) list.append(el("li", { class: "note" }, "note: " + n));
  const verdicts = Object.entries(result.commands || {});
  if (verdicts.length) list.append(el("li", { class: "commands" }, "commands: " + verdicts.map(([c, p]) => `${c} ${p.length ? "not ready" : "ready"}`).join(", ")));
  for (const [c, probs] of verdicts) if (c !== "train") for (const p of probs) list.append(el("li", { class: "note" }, `${c}: ${p}`));
  const v = $("#verdict");
  v.className = "verdict " + (result.ok ? "ok" : "bad");
  v.textContent = result.ok ? "config OK" : result.schema_ok ? "the schema accepts it; not ready to train" :
                  `${(result.problems || []).length} problem(s)`;
}

async function save() {
  const body = state.textMode ? { path: state.path, text: $("#toml-text").value } : { path: state.path, data: state.data };
  try {
    const cfg = await api("POST", "api/save", body);
    state.data = cfg.data; $("#toml-text").value = cfg.text; renderForm(); showVerdict(cfg);
    $("#verdict").textContent += " — saved";
  } catch (e) {
    showVerdict({ ok: false, problems: (e.body && e.body.problems) || [{ key: null, message: e.message }], notes: [] });
    $("#verdict").textContent = "not saved: " + $("#verdict").textContent;
  }
}

function setTextMode(on) {
  state.textMode = on;
  $("#toml-text").hidden = !on; $("#form").hidden = on;
  $("#toggle-text").textContent = on ? "Form" : "TOML text";
}
async function toggleText() {
  if (!state.textMode) { // form -> text: what the form holds, rendered by the server with the file's comments
    try { const res = await api("POST", "api/validate", { path: state.path, data: state.data }); $("#toml-text").value = res.text; }
    catch (e) { /* keep the text as it was */ }
    setTextMode(true); return;
  }
  try {
    const res = await api("POST", "api/validate", { path: state.path, text: $("#toml-text").value });
    state.data = res.data;
    setTextMode(false); renderForm(); showVerdict(res);
  } catch (e) { showVerdict({ ok: false, problems: (e.body && e.body.problems) || [{ key: null, message: e.message }] }); }
}

// ---- 4. runs -----------------------------------------------------------------------------------------------
async function startRun(command) {
  if (!state.path) return;
  try {
    const run = await api("POST", "api/runs", { config: state.path, command });
    followRun(run.id);
  } catch (e) {
    $("#log").textContent = "refused: " + e.message + "\n";
    if (e.body && e.body.problems) showVerdict({ ok: false, problems: e.body.problems });
  }
}

function followRun(id) {
  state.runId = id; state.next = 0; $("#log").textContent = "";
  clearInterval(state.runTimer); state.runTimer = setInterval(pollRun, 1000); pollRun();
}

async function pollRun() {
  if (state.runId === null) return;
  const run = await api("GET", `api/runs/${state.runId}?since=${state.next}`);
  state.next = run.next;
  const log = $("#log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  if (run.lines.length) log.textContent += run.lines.join("\n") + "\n";
  if (atEnd) log.scrollTop = log.scrollHeight;
  const p = run.progress || {};
  const live = run.status === "running" || run.status === "stopping";
  $("#stop").disabled = !live;
  $("#progress-fill").style.width = p.total ? (100 * p.step / p.total) + "%" : "0";
  $("#progress-text").textContent = `${run.command}: ${run.status}` + (p.total ? ` — step ${p.step}/${p.total}, ETA ${p.eta}` +
    (p.loss ? `, loss ${p.loss}` : "") + (p.lr ? `, lr ${p.lr}` : "") + (p.val ? `, val ${p.val}` : "") : "") +
    (run.returncode !== null ? ` (exit ${run.returncode})` : "");
  $("#progress").dataset.status = run.status;
  if (!live) { clearInterval(state.runTimer); state.runTimer = null; }
  refreshRunList();
}

async function refreshRunList() {
  const { runs } = await api("GET", "api/runs");
  $("#run-list").replaceChildren(...runs.map((r) => el("li", { class: r.id === state.runId ? "shown" : "", onclick: () => followRun(r.id) },
    `#${r.id} ${r.command} ${r.status}${r.returncode !== null ? " (" + r.returncode + ")" : ""} — ${r.config}`)));
}

// ---- 5. watch: curves, samples, saves ----------------------------------------------------------------------
const COLORS = ["#4f7cff", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#5c940d", "#862e9c"];
const GROUPS = [["loss", (t) => t.startsWith("loss/")], ["validation loss", (t) => t === "val/loss"],
                ["learning rate", (t) => t.startsWith("lr/")], ["validation loss per timestep", (t) => /^val\/loss_t\d+$/.test(t)],
                ["grad norm", (t) => t === "grad_norm"]];

function chart(title, series) {
  const W = 440, H = 180, P = 52;
  const pts = series.flatMap((s) => s.points);
  const box = el("div", { class: "chart", "data-chart": title, "data-points": String(pts.length) }, el("h4", {}, title));
  if (!pts.length) return box;
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += Math.abs(y1) * 0.05 + 1e-9; y0 -= Math.abs(y0) * 0.05 + 1e-9; }
  const sx = (x) => P + (W - P - 6) * (x - x0) / (x1 - x0), sy = (y) => H - 18 - (H - 26) * (y - y0) / (y1 - y0);
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const text = (x, y, s, anchor) => { const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y);
    t.setAttribute("font-size", "10"); t.setAttribute("text-anchor", anchor || "start"); t.textContent = s; svg.append(t); };
  const axis = document.createElementNS(ns, "path"); axis.setAttribute("d", `M${P},4 V${H - 18} H${W - 6}`);
  axis.setAttribute("stroke", "#999"); axis.setAttribute("fill", "none"); svg.append(axis);
  text(P - 2, 12, y1.toPrecision(3), "end"); text(P - 2, H - 18, y0.toPrecision(3), "end");
  text(P, H - 4, String(x0)); text(W - 6, H - 4, String(x1), "end");
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "1.5");
    line.setAttribute("data-tag", s.tag); svg.append(line);
    if (s.points.length === 1) { const c = document.createElementNS(ns, "circle"); c.setAttribute("cx", sx(s.points[0][0]));
      c.setAttribute("cy", sy(s.points[0][1])); c.setAttribute("r", 3); c.setAttribute("fill", color); svg.append(c); }
    legend.append(el("span", { style: `color:${color}` }, `${s.tag} (${s.points.length})`));
  });
  box.append(svg, legend);
  return box;
}

function fileUrl(path, mtime) { return "api/file?path=" + encodeURIComponent(path) + "&v=" + mtime; }

function syncGallery(container, items) {
  const want = items.map((m) => m.path + "@" + m.mtime);
  const have = [...container.children].map((f) => f.dataset.id);
  if (want.join("|") === have.join("|")) return;
  container.replaceChildren(...items.map((m) => el("figure", { "data-id": m.path + "@" + m.mtime, "data-name": m.name },
    m.kind === "video" ? el("video", { src: fileUrl(m.path, m.mtime), controls: true, loop: true, muted: true, autoplay: true, playsinline: true })
                       : el("img", { src: fileUrl(m.path, m.mtime), alt: m.name }),
    el("figcaption", {}, m.name))));
}

async function refreshWatch() {
  if (!state.path) return;
  let w;
  try { w = await api("GET", "api/watch?config=" + encodeURIComponent(state.path)); } catch (e) { return; }
  const charts = $("#charts"); charts.replaceChildren();
  for (const [title, match] of GROUPS) {
    const tags = Object.keys(w.scalars).filter(match).sort();
    if (tags.length || title === "loss") charts.append(chart(title, tags.map((t) => ({ tag: t, points: w.scalars[t] }))));
  }
  syncGallery($("#samples"), w.samples);
  syncGallery($("#doctor"), w.doctor);
  $("#saves tbody").replaceChildren(...w.saves.map((s) => el("tr", { "data-kind": s.kind },
    el("td", {}, s.name), el("td", {}, s.kind), el("td", {}, s.step === null ? "final" : (s.epoch ? "epoch " : "") + s.step),
    el("td", {}, s.size ? (s.size / 1048576).toFixed(2) + " MiB" : ""))));
}

function startWatch() { clearInterval(state.watchTimer); refreshWatch(); state.watchTimer = setInterval(refreshWatch, 2000); }

// ---- 6. start ----------------------------------------------------------------------------------------------
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== "tab-" + name;
}

async function newConfig() {
  const name = $("#new-name").value.trim();
  if (!name) return;
  try {
    const cfg = await api("POST", "api/save", { path: name.endsWith(".toml") ? name : name + ".toml", data: {}, create: true });
    await loadConfigs(); await openConfig(cfg.path);
  } catch (e) { alert(e.message); }
}

async function main() {
  state.info = await api("GET", "api/info");
  state.schema = await api("GET", "api/schema");
  if (!state.info.estimate) { const b = $("#estimate-button"); b.disabled = true; b.title = "this installation has no `wantrainer estimate`"; }
  for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  for (const b of document.querySelectorAll("#commands [data-command]")) b.addEventListener("click", () => startRun(b.dataset.command));
  $("#stop").addEventListener("click", async () => { if (state.runId !== null) { await api("POST", `api/runs/${state.runId}/stop`); pollRun(); } });
  $("#save").addEventListener("click", save);
  $("#toggle-text").addEventListener("click", toggleText);
  $("#toml-text").addEventListener("input", scheduleValidate);
  $("#new-config").addEventListener("click", newConfig);
  await loadConfigs();
  refreshRunList();
}
main();
