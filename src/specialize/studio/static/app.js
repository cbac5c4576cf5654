// The studio page: six tabs over the JSON API (app.py). User text is always set as textContent,
// never as HTML. State-changing calls send the X-Studio header the server requires.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { files: [], runs: [], jobs: [], form: [], detail: null, chats: {} };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

async function api(path, opts) {
  opts = opts || {};
  const init = { method: opts.method || "GET", credentials: "same-origin", headers: {} };
  if (init.method !== "GET") init.headers["X-Studio"] = "1";
  if (opts.body !== undefined) {
    if (opts.raw) init.body = opts.body;
    else { init.body = JSON.stringify(opts.body); init.headers["Content-Type"] = "application/json"; }
  }
  const res = await fetch(path, init);
  if (opts.stream) { if (!res.ok) throw new Error(await errorOf(res)); return res; }
  if (!res.ok) throw new Error(await errorOf(res));
  return res.json();
}

async function errorOf(res) {
  try { const j = await res.json(); return j.error || JSON.stringify(j); } catch (e) { return `HTTP ${res.status}`; }
}

function say(text, bad) {
  const m = $("message");
  m.textContent = text; m.hidden = !text; m.className = bad ? "bad" : "";
  if (text && !bad) setTimeout(() => { if (m.textContent === text) m.hidden = true; }, 4000);
}

async function guarded(fn) {
  try { await fn(); } catch (e) { say(e.message, true); }
}

const num = (v, d) => (v === null || v === undefined || v === "" ? "–" : Number(v).toFixed(d === undefined ? 3 : d));

// ---- tabs -------------------------------------------------------------------------------------
function showTab(name) {
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== `tab-${name}`; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "runs" || name === "compare" || name === "playground" || name === "export") refreshRuns();
}

// ---- data -------------------------------------------------------------------------------------
async function refreshFiles() {
  const data = await api("/api/files");
  state.files = data.files;
  $("workspace").textContent = `workspace: ${data.workspace}`;
  const picked = new Set(pickedFiles());
  for (const select of [$("files"), $("compare-data")]) {
    const keep = new Set([...select.selectedOptions].map((o) => o.value));
    select.textContent = "";
    for (const f of state.files) {
      select.appendChild(el("option", { value: f.path, selected: keep.has(f.path) || (select.id === "files" && picked.has(f.path)) },
        `${f.path} (${(f.bytes / 1024).toFixed(1)} KiB)`));
    }
  }
  const evalSelect = $("lint-eval"), current = evalSelect.value;
  evalSelect.textContent = "";
  evalSelect.appendChild(el("option", { value: "" }, "none"));
  for (const f of state.files) evalSelect.appendChild(el("option", { value: f.path, selected: f.path === current }, f.path));
  const list = $("workspace-files") || document.body.appendChild(el("datalist", { id: "workspace-files" }));
  list.textContent = "";
  for (const f of state.files) list.appendChild(el("option", { value: f.path }));
}

const pickedFiles = () => [...$("files").selectedOptions].map((o) => o.value);

async function upload(file) {
  const path = `uploads/${file.name}`;
  const saved = await api(`/api/files?path=${encodeURIComponent(path)}`, { method: "PUT", body: file, raw: true });
  say(`uploaded ${saved.path} (${saved.bytes} bytes)`);
  await refreshFiles();
  [...$("files").options].forEach((o) => { o.selected = o.value === saved.path; });
}

function rowsTable(rows) {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r.data)))];
  const show = (v) => (typeof v === "string" ? v : JSON.stringify(v, null, 1));
  return el("table", { class: "rows" },
    el("thead", {}, el("tr", {}, el("th", {}, "line"), keys.map((k) => el("th", {}, k)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, String(r.line ?? "")),
      keys.map((k) => el("td", {}, r.data[k] === undefined ? "" : show(r.data[k])))))));
}

async function preview() {
  const [path] = pickedFiles();
  if (!path) throw new Error("pick a file first");
  const data = await api(`/api/files/preview?path=${encodeURIComponent(path)}`);
  $("data-out").replaceChildren(el("h3", {}, `${data.path}: ${data.total} rows (first ${data.rows.length} shown)`),
    rowsTable(data.rows));
}

function conversation(messages) {
  if (typeof messages === "string") return el("pre", {}, messages);
  return el("div", { class: "conversation" }, messages.map((m) => el("div", { class: `turn ${m.role}` },
    el("b", {}, `${m.role}: `), m.content)));
}

async function lint() {
  const data = pickedFiles();
  if (!data.length) throw new Error("pick a file first");
  const body = { data };
  if ($("lint-eval").value) body.eval_data = [$("lint-eval").value];
  if ($("lint-base").value.trim()) body.base = $("lint-base").value.trim();
  $("data-out").replaceChildren(el("p", { class: "muted" }, "linting…"));
  const r = await api("/api/lint", { method: "POST", body });
  const out = [];
  out.push(el("h3", { id: "lint-verdict", class: r.ok ? "good" : "bad" },
    r.ok ? `OK: ${r.train} training examples, ${r.warnings} warning(s)` :
      `FAILED: ${r.errors} error(s), ${r.warnings} warning(s) in ${r.train + r.eval} examples`));
  out.push(el("p", { class: "muted" }, `template '${r.template}'; ${r.max_seq_tokens ? `max ${r.max_seq_tokens} tokens` :
    "no base: lengths in UTF-8 bytes"}; trained ${r.unit}: ${r.trained} of ${r.total}`));
  const findings = el("div", { id: "findings" });
  for (const f of r.findings) {
    const rowsBox = el("div", { class: "finding-rows" });
    findings.appendChild(el("div", { class: `finding ${f.severity}` },
      el("div", {}, el("b", {}, `${f.severity} ${f.code}`), `: ${f.message}`),
      el("div", { class: "sources" }, f.sources.map((s) => el("button", { class: "link", onclick: () => {
        const parts = s.replace("≈", "=").split(" = ").map((p) => p.split(" (")[0].trim());
        rowsBox.replaceChildren(...parts.filter((p) => r.rows[p] !== undefined)
          .map((p) => el("div", { class: "row-shown" }, el("div", { class: "muted" }, p), conversation(r.rows[p]))));
      } }, s)), f.count > f.sources.length ? ` (+${f.count - f.sources.length} more)` : ""),
      rowsBox));
  }
  out.push(el("h3", {}, "Findings"), r.findings.length ? findings : el("p", { class: "good" }, "no problems found"));
  out.push(el("h3", {}, "What the model will learn"),
    el("p", { class: "muted" }, "Highlighted text is trained (answer tokens and EOS); the rest is masked prompt."));
  for (const ex of r.examples) {
    out.push(el("div", { class: "example" }, el("div", { class: "muted" }, ex.source),
      el("pre", { class: "marked" }, ex.pieces.map(([text, trained]) =>
        trained ? el("mark", { class: "trained" }, text) : el("span", {}, text)))));
  }
  if (r.lengths.length) out.push(el("pre", { class: "lengths" }, r.lengths.join("\n")));
  $("data-out").replaceChildren(...out);
}

async function convert() {
  const inputs = pickedFiles();
  if (!inputs.length) throw new Error("pick files to convert first");
  const r = await api("/api/convert", { method: "POST", body: { inputs, to: $("convert-to").value, kind: $("convert-kind").value } });
  $("data-out").replaceChildren(el("h3", {}, `wrote ${r.to}`), el("pre", {}, r.summary));
  await refreshFiles();
}

// ---- train form -------------------------------------------------------------------------------
function fieldInput(f) {
  const id = `f-${f.name}`;
  let input;
  if (f.kind === "bool") input = el("input", { type: "checkbox", id, checked: !!f.default });
  else if (f.kind === "choice") input = el("select", { id }, f.choices.map((c) => el("option", { selected: c === f.default }, String(c))));
  else if (f.kind === "list") input = el("textarea", { id, rows: 2, placeholder: "one per line", list: "workspace-files" },
    (f.default || []).join("\n"));
  else input = el("input", { id, type: f.kind === "text" ? "text" : "number", step: f.kind === "float" ? "any" : "1",
    value: f.default === null ? "" : f.default, placeholder: f.default === null ? "default" : "",
    list: f.path ? "workspace-files" : undefined });
  return el("label", { class: `field ${f.kind}`, title: f.help }, el("span", { class: "name" }, f.flag), input,
    el("small", {}, f.help));
}

async function buildForm() {
  const { fields } = await api("/api/forms/finetune");
  state.form = fields;
  // The fields a first run needs come first, whatever CLI help panel they are in.
  const primary = ["base", "data", "out", "method", "max_steps", "epochs", "learning_rate", "micro_batch_size",
    "eval_data", "eval_every"];
  const groups = { "Fine-tuning": primary.map((n) => fields.find((f) => f.name === n)).filter(Boolean) };
  for (const f of fields) {
    if (primary.includes(f.name)) continue;
    (groups[f.panel || "More fine-tuning settings"] = groups[f.panel || "More fine-tuning settings"] || []).push(f);
  }
  const form = $("train-form");
  form.textContent = "";
  for (const [name, list] of Object.entries(groups)) {
    if (name !== "Fine-tuning") form.appendChild(el("details", {}, el("summary", {}, name), el("fieldset", {}, list.map(fieldInput))));
    else form.appendChild(el("fieldset", {}, el("legend", {}, name), list.map(fieldInput)));
  }
  form.addEventListener("input", showCommand);
  showCommand();
}

function formValues() {
  const values = {};
  for (const f of state.form) {
    const input = $(`f-${f.name}`);
    let v;
    if (f.kind === "bool") v = input.checked;
    else if (f.kind === "list") v = input.value.split("\n").map((s) => s.trim()).filter(Boolean);
    else if (f.kind === "int") v = input.value === "" ? null : parseInt(input.value, 10);
    else if (f.kind === "float") v = input.value === "" ? null : parseFloat(input.value);
    else v = input.value === "" && f.default !== "" ? null : input.value;
    const same = JSON.stringify(v) === JSON.stringify(f.kind === "list" ? (f.default || []) : f.default);
    if (!same) values[f.name] = v;
  }
  return values;
}

function showCommand() {
  const parts = ["specialize finetune"];
  for (const [k, v] of Object.entries(formValues())) {
    const flag = "--" + k.replaceAll("_", "-");
    if (v === true) parts.push(flag); else if (v === false) parts.push(`--no-${k.replaceAll("_", "-")}`);
    else if (Array.isArray(v)) v.forEach((x) => parts.push(flag, x)); else parts.push(flag, v === null ? "none" : v);
  }
  $("train-command").textContent = parts.join(" ");
}

async function launch() {
  const job = await api("/api/jobs/finetune", { method: "POST", body: formValues() });
  say(`queued ${job.command}`);
  await refreshJobs();
  showTab("runs");
  openRun(job.target, job.id);
}

// ---- jobs -------------------------------------------------------------------------------------
async function refreshJobs() {
  const { jobs } = await api("/api/jobs");
  state.jobs = jobs;
  $("jobs").tBodies[0].replaceChildren(...jobs.map((j) => el("tr", {},
    el("td", {}, j.id), el("td", { class: `state ${j.state}` }, j.state + (j.returncode !== null ? ` (${j.returncode})` : "")),
    el("td", {}, j.target || ""), el("td", {}, el("code", {}, j.command)),
    el("td", {}, ["queued", "running"].includes(j.state) ?
      el("button", { class: "danger small", onclick: () => guarded(() => stopJob(j.id)) }, "Stop") : ""))));
}

async function stopJob(id) {
  await api(`/api/jobs/${id}/stop`, { method: "POST" });
  say("stop sent: the run checkpoints at the next step and ends");
  await refreshJobs();
}

const jobFor = (target) => state.jobs.find((j) => j.target === target);

// ---- runs -------------------------------------------------------------------------------------
async function refreshRuns() {
  const { runs } = await api("/api/runs");
  if (JSON.stringify(runs) === JSON.stringify(state.runs)) return;  // no redraw: a click is not lost to one
  state.runs = runs;
  $("runs").tBodies[0].replaceChildren(...runs.map((r) => el("tr", { class: "run", "data-run": r.path,
    onclick: () => openRun(r.path) },
  el("td", {}, r.path), el("td", { class: `state ${r.state}` }, r.state), el("td", {}, String(r.base ?? "")),
  el("td", {}, String(r.method ?? "")), el("td", {}, `${r.step}${r.total_steps ? "/" + r.total_steps : ""}`),
  el("td", {}, num(r.loss)), el("td", {}, num(r.eval_loss)), el("td", {}, num(r.tokens_per_s, 0)),
  el("td", {}, r.recommendation ? `→ ${r.recommendation}` : ""))));
  for (const id of ["compare-run", "chat-run", "export-run"]) {
    const select = $(id), current = select.value;
    select.textContent = "";
    for (const r of runs.filter((x) => x.has_model)) select.appendChild(el("option", { value: r.path, selected: r.path === current }, r.path));
  }
}

function openRun(path) {
  state.detail = { path, offset: 0, fileId: null, rows: [] };
  $("run-detail").hidden = false;
  $("run-title").textContent = path;
  drawRun();
  pollRun();
}

async function pollRun() {
  const d = state.detail;
  if (!d) return;
  let r;
  try {
    r = await api(`/api/runs/metrics?run=${encodeURIComponent(d.path)}&offset=${d.offset}&file_id=${d.fileId || ""}`);
  } catch (e) { // a run not started yet (still queued) has no folder: keep waiting
    d.summary = null; drawRun(); return;
  }
  if (state.detail !== d) return;
  if (r.reset) d.rows = [];
  d.rows.push(...r.rows); d.offset = r.offset; d.fileId = r.file_id; d.summary = r.run;
  drawRun();
}

function drawRun() {
  const d = state.detail;
  const s = d.summary, job = jobFor(d.path);
  const train = d.rows.filter((x) => "loss" in x), evals = d.rows.filter((x) => "eval_loss" in x);
  lineChart($("loss-chart"), [
    { name: "loss", color: "#2563eb", points: train.map((x) => [x.step, x.loss]) },
    { name: "eval loss", color: "#dc2626", points: evals.map((x) => [x.step, x.eval_loss]) }], { label: "loss" });
  lineChart($("speed-chart"), [
    { name: "tokens/s", color: "#059669", points: train.map((x) => [x.step, x.tokens_per_s]) }], { label: "tokens/s" });
  const step = s ? s.step : 0, total = s ? s.total_steps : null;
  $("run-progress-bar").style.width = total ? `${Math.min(100, 100 * step / total)}%` : "0%";
  const running = (job && ["queued", "running"].includes(job.state)) || (s && s.state === "running");
  const label = !s ? (job ? `job ${job.state}` : "no run folder yet") :
    `${s.state}${job && job.state === "queued" ? " (queued)" : ""} · step ${step}${total ? "/" + total : ""}` +
    ` · loss ${num(s.loss)} · eval loss ${num(s.eval_loss)} · ${num(s.tokens_per_s, 0)} tokens/s`;
  $("run-progress").textContent = label;
  $("run-stop").hidden = !(job && ["queued", "running"].includes(job.state));
  $("run-resume").hidden = !(s && s.state === "stopped" && !running);
  if (job) api(`/api/jobs/${job.id}/log`).then((r) => { $("run-log").textContent = r.log; }).catch(() => {});
}

// ---- compare ----------------------------------------------------------------------------------
async function startCompare() {
  const run = $("compare-run").value;
  const data = [...$("compare-data").selectedOptions].map((o) => o.value);
  if (!run || !data.length) throw new Error("pick a run and at least one test file");
  const body = { model: run, data, out: `${run}/compare`, task: $("compare-task").value };
  if ($("compare-docs").value.trim()) body.docs = $("compare-docs").value.trim();
  const job = await api("/api/jobs/compare", { method: "POST", body });
  say(`queued ${job.command}`);
  await refreshJobs();
  showCompare();
}

async function showCompare() {
  const run = $("compare-run").value;
  if (!run) return;
  const job = jobFor(`${run}/compare`);
  $("compare-status").textContent = job ? `compare job ${job.state}` : "";
  let card;
  try { card = await api(`/api/runs/scorecard?run=${encodeURIComponent(run)}`); } catch (e) {
    $("scorecard").textContent = ""; $("report").hidden = true; return;
  }
  const rec = card.recommendation || {};
  const splits = [...new Set(card.systems.flatMap((s) => Object.keys(s.splits)))];
  const metric = rec.metric || "f1";
  $("scorecard").replaceChildren(
    el("div", { id: "recommendation", class: "recommendation" }, el("b", {}, `Recommendation: ${rec.system || "–"}`),
      el("ul", {}, (rec.reasons || []).map((x) => el("li", {}, x)))),
    el("table", { id: "scorecard-table" }, el("thead", {}, el("tr", {}, el("th", {}, "system"),
      splits.map((sp) => el("th", {}, `${sp} ${metric}`)), el("th", {}, "hallucination"), el("th", {}, "prompt tokens"),
      el("th", {}, "latency s"))),
    el("tbody", {}, card.systems.map((s) => el("tr", { class: s.name === rec.system ? "chosen" : "" },
      el("td", {}, s.name), splits.map((sp) => el("td", {}, num((s.splits[sp] || {})[metric]))),
      el("td", {}, num(Object.values(s.splits)[0]?.hallucination_rate)), el("td", {}, num(s.prompt_tokens_per_example, 0)),
      el("td", {}, num(s.latency_s_per_example)))))));
  const frame = $("report");
  const src = `/api/runs/report?run=${encodeURIComponent(run)}`;
  if (frame.getAttribute("src") !== src) frame.src = src;
  frame.hidden = false;
}

// ---- playground -------------------------------------------------------------------------------
function chatSystems() {
  return ["run", $("chat-with-base").checked ? "base" : null, $("chat-with-rag").checked ? "rag" : null].filter(Boolean);
}

function drawChats() {
  const names = { run: "the run", base: "its base", rag: "the run + RAG" };
  $("chat-columns").replaceChildren(...chatSystems().map((sys) => {
    const history = state.chats[sys] = state.chats[sys] || [];
    return el("div", { class: "chat-column", id: `answers-${sys}` }, el("h3", {}, names[sys]),
      history.map((m) => el("div", { class: `bubble ${m.role}${m.role === "assistant" ? " done" : ""}` },
        el("span", { class: "answer" }, m.content.trim() ? m.content : "(only white space)"),
        m.caption ? el("span", { class: "caption" }, m.caption) : null)));
  }));
}

async function send(text) {
  for (const sys of chatSystems()) {
    const history = state.chats[sys] = state.chats[sys] || [];
    history.push({ role: "user", content: text });
    const answer = { role: "assistant", content: "" };
    drawChats();
    const column = $(`answers-${sys}`);
    const bubble = column.appendChild(el("div", { class: "bubble assistant streaming" }));
    const shown = bubble.appendChild(el("span", { class: "answer" }));
    const body = { run: $("chat-run").value, system: sys, messages: history.map((m) => ({ role: m.role, content: m.content })),
      max_new_tokens: +$("chat-max").value,
      temperature: +$("chat-temp").value };
    if ($("chat-docs").value.trim()) body.docs = $("chat-docs").value.trim();
    const res = await api("/api/chat", { method: "POST", body, stream: true });
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "", failed = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl)); buffer = buffer.slice(nl + 1);
        if (event.text) { answer.content += event.text; shown.textContent = answer.content; }
        if (event.passages) column.insertBefore(el("details", { class: "passages" },
          el("summary", {}, `${event.passages.length} passage(s) retrieved`),
          event.passages.map((p) => el("p", {}, el("b", {}, p.source + ": "), p.text))), bubble);
        if (event.error) failed = event.error;
        if (event.done) {
          bubble.dataset.finish = event.done.finish_reason;
          if (!answer.content.trim()) shown.textContent = "(only white space)";
          answer.caption = `${event.done.completion_tokens} tokens · ${event.done.finish_reason === "stop" ? "stopped" : "hit the limit"}`;
          bubble.appendChild(el("span", { class: "caption" }, answer.caption));
        }
      }
    }
    bubble.classList.remove("streaming");
    if (failed) { history.pop(); bubble.classList.add("error"); shown.textContent = failed; continue; }
    history.push(answer);
    bubble.classList.add("done");
  }
}

// ---- export -----------------------------------------------------------------------------------
async function startExport() {
  const run = $("export-run").value;
  if (!run) throw new Error("pick a finished run");
  const out = $("export-out").value.trim() || `exports/${run.split("/").pop()}`;
  const job = await api("/api/jobs/export", { method: "POST", body: { model: run, out, dtype: $("export-dtype").value } });
  say(`queued ${job.command}`);
  $("export-out").value = out;
  await refreshJobs();
  showExport();
}

async function showExport() {
  const out = $("export-out").value.trim();
  if (!out) return;
  const job = jobFor(out);
  $("export-status").textContent = job ? `export job ${job.state}` : "";
  let info;
  try { info = await api(`/api/exports/info?path=${encodeURIComponent(out)}`); } catch (e) { return; }
  const name = out.split("/").pop();
  const cmds = [
    ["serve it here (OpenAI-compatible)", `specialize serve --model ${$("export-run").value}`],
    ["vLLM", `vllm serve ${out}`],
    ["Ollama", `ollama create ${name} -f ${out}/Modelfile && ollama run ${name}`],
    ["transformers", `python -c "from transformers import pipeline; p = pipeline('text-generation', '${out}'); ` +
      `print(p([{'role': 'user', 'content': 'Hello'}])[0]['generated_text'])"`],
    ["llama.cpp (GGUF)", `specialize export --model ${$("export-run").value} --out ${out} --gguf`],
  ];
  $("export-commands").replaceChildren(el("p", { id: "export-done" }, `${out}: ${info.info.method}, ${info.info.dtype}, parity ${info.info.parity}`),
    ...cmds.map(([what, cmd]) => el("div", { class: "command" }, el("div", { class: "muted" }, what), el("pre", {}, cmd))));
}

// ---- start ------------------------------------------------------------------------------------
function every(ms, fn) { setInterval(() => { if (!document.hidden) fn().catch(() => {}); }, ms); }

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("refresh-files").addEventListener("click", () => guarded(refreshFiles));
  $("upload").addEventListener("change", (e) => guarded(() => upload(e.target.files[0])));
  $("preview").addEventListener("click", () => guarded(preview));
  $("lint").addEventListener("click", () => guarded(lint));
  $("convert").addEventListener("click", () => guarded(convert));
  $("launch").addEventListener("click", () => guarded(launch));
  $("refresh-runs").addEventListener("click", () => guarded(refreshRuns));
  $("run-stop").addEventListener("click", () => guarded(() => stopJob(jobFor(state.detail.path).id)));
  $("run-resume").addEventListener("click", () => guarded(async () => {
    const job = await api("/api/runs/resume", { method: "POST", body: { run: state.detail.path } });
    say(`queued ${job.command}`); await refreshJobs();
  }));
  $("compare-start").addEventListener("click", () => guarded(startCompare));
  $("compare-run").addEventListener("change", () => guarded(showCompare));
  $("export-start").addEventListener("click", () => guarded(startExport));
  for (const id of ["chat-with-base", "chat-with-rag", "chat-run"]) $(id).addEventListener("change", drawChats);
  $("chat-clear").addEventListener("click", () => { state.chats = {}; drawChats(); });
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    guarded(() => send(text));
  });
  showTab((location.hash || "#data").slice(1));
  guarded(async () => { await refreshFiles(); await buildForm(); await refreshJobs(); await refreshRuns(); drawChats(); });
  every(1000, async () => {
    await refreshJobs();
    if (state.detail && !$("tab-runs").hidden) {
      await pollRun();
      if (state.detail.summary && !state.runs.some((r) => r.path === state.detail.path)) await refreshRuns();
    }
    if (!$("tab-compare").hidden) await showCompare();
    if (!$("tab-export").hidden) await showExport();
  });
  every(5000, async () => { if (!$("tab-runs").hidden) await refreshRuns(); });
});
