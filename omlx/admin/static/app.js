// The omlx admin panel: one page, plain DOM, talking to the server's own API.
"use strict";

const state = { csrf: null, tab: null, timers: [], logSource: null, chat: [], chatAbort: null,
                models: [], editing: new Set(), selectedRepo: null };

// ------------------------------------------------------------------ helpers
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
const num = (x, digits = 1) => (x === null || x === undefined) ? "–" : Number(x).toFixed(digits);
const ms = (s) => (s === null || s === undefined) ? "–" : (s * 1000).toFixed(1) + " ms";
const pct = (x) => (x === null || x === undefined) ? "–" : (x * 100).toFixed(1) + "%";

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, { method, headers, credentials: "same-origin",
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (response.status === 401 && !path.startsWith("/admin/api/login")) { showLogin(); }
  if (!response.ok) {
    const message = (data && data.error && (data.error.message || data.error)) || response.statusText;
    throw new ApiError(typeof message === "string" ? message : JSON.stringify(message));
  }
  return data;
}

function showError(node, error) {
  node.textContent = error ? (error.message || String(error)) : "";
  node.hidden = !error;
}

function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

// ------------------------------------------------------------------ login and tabs
async function start() {
  const session = await api("GET", "/admin/api/session");
  $("#version").textContent = "v" + session.version;
  if (session.auth_required && !session.logged_in) return showLogin();
  state.csrf = session.csrf_token;
  $("#logout").hidden = !session.auth_required;
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  route();
}

function showLogin() {
  stopTab();
  document.querySelectorAll(".page").forEach((p) => p.hidden = true);
  $("#tabs").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#api-key").focus();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const result = await api("POST", "/admin/api/login", { api_key: $("#api-key").value });
    $("#api-key").value = "";
    showError($("#login-error"), null);
    state.csrf = result.csrf_token;
    await start();
  } catch (error) {
    showError($("#login-error"), error);
  }
});

$("#logout").addEventListener("click", async () => {
  await api("POST", "/admin/api/logout");
  state.csrf = null;
  showLogin();
});

function stopTab() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  if (state.logSource) { state.logSource.close(); state.logSource = null; }
}

const TABS = { status: showStatus, models: showModels, downloader: showDownloader, chat: showChat, logs: showLogs };

function route() {
  if (!$("#login").hidden) return;
  const tab = (location.hash || "#status").slice(1);
  const show = TABS[tab] || showStatus;
  stopTab();
  state.tab = TABS[tab] ? tab : "status";
  document.querySelectorAll(".page").forEach((p) => p.hidden = p.id !== state.tab);
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === state.tab));
  show();
}
window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ status
// "2 prompts: 1,024 / 4,567 tokens, ~12 s left" (the estimate from the current prefill rate).
function prefillProgress(prompts, tps) {
  const done = prompts.reduce((a, p) => a + p.done, 0), total = prompts.reduce((a, p) => a + p.total, 0);
  const left = tps > 0 ? ", ~" + Math.ceil((total - done) / tps) + " s left" : "";
  return prompts.length + (prompts.length === 1 ? " prompt: " : " prompts: ") + done.toLocaleString("en-US") +
    " / " + total.toLocaleString("en-US") + " tokens" + left;
}
function showStatus() {
  every(1000, async () => {
    let stats;
    try { stats = await api("GET", "/admin/api/stats"); } catch (e) { return; }
    $("#uptime").textContent = "up " + Math.round(stats.uptime_s) + " s";
    const cards = stats.models.map((m) => {
      const rows = [["memory", bytes(m.memory_bytes)]];
      if (m.kind === "llm") {
        const kv = m.kv_cache;
        rows.unshift(["running / waiting", m.running + " / " + m.waiting],
                     ["prefill", num(m.prefill_tps) + " tok/s"], ["decode", num(m.decode_tps) + " tok/s"]);
        if (m.prefilling.length) rows.splice(1, 0, ["prompts in prefill", prefillProgress(m.prefilling, m.prefill_tps)]);
        rows.push(["KV pool", bytes(kv.bytes) + " of " + bytes(kv.max_bytes) + " max"],
                  ["KV blocks used", kv.used_blocks + " / " + kv.max_blocks + " (" + pct(kv.usage) + ")"],
                  ["prefix-cache hit rate", pct(kv.prefix_cache_hit_rate)],
                  ["preemptions", m.preemptions],
                  ["disk tier", m.disk ? m.disk.blocks + " blocks, " + bytes(m.disk.bytes) + " of " + bytes(m.disk.max_bytes) : "off"]);
      }
      return el("div", { class: "card", "data-model-id": m.id },
        el("h3", {}, m.id, " ", el("span", { class: "muted" }, m.kind)),
        m.kind === "llm" ? el("div", { class: "bar", title: "KV cache use" },
                              el("div", { style: "width:" + (m.kv_cache.usage * 100).toFixed(1) + "%" })) : null,
        el("div", { class: "kv" }, rows.flatMap(([k, v]) => [el("span", { class: "muted" }, k), el("span", {}, v)])));
    });
    $("#status-models").replaceChildren(...(cards.length ? cards : [el("p", { class: "muted" }, "No model is loaded.")]));
    const mem = stats.memory;
    $("#status-memory").replaceChildren(
      el("div", { class: "bar" }, el("div", { style: "width:" + Math.min(100, mem.used_bytes / mem.budget_bytes * 100).toFixed(1) + "%" })),
      el("p", {}, bytes(mem.used_bytes) + " of " + bytes(mem.budget_bytes) + " budget"),
      el("table", {}, el("tbody", {}, mem.holders.map((h) => el("tr", {}, el("td", {}, h.holder), el("td", {}, bytes(h.bytes)))))));
    $("#status-totals").replaceChildren(totalsTable(stats));
    $("#status-latency").replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["model", "requests", "TTFT p50", "p90", "p99", "ITL p50", "p90", "p99"].map((h) => el("th", {}, h)))),
      el("tbody", {}, Object.entries(stats.latency).map(([model, l]) => el("tr", {},
        el("td", {}, model), el("td", {}, l.samples),
        el("td", {}, ms(l.ttft_s.p50)), el("td", {}, ms(l.ttft_s.p90)), el("td", {}, ms(l.ttft_s.p99)),
        el("td", {}, ms(l.itl_s.p50)), el("td", {}, ms(l.itl_s.p90)), el("td", {}, ms(l.itl_s.p99)))))));
  });
}

function totalsTable(stats) {
  const head = ["", "model", "requests", "prompt tokens", "cached", "cache efficiency", "generated", "avg prefill tok/s", "avg decode tok/s"];
  const rows = [];
  for (const [label, table] of [["since start", stats.session], ["all-time", stats.all_time]]) {
    const entries = Object.entries(table.models);
    entries.push(["(all)", table.total]);
    for (const [model, t] of entries) {
      rows.push(el("tr", { "data-scope": label === "since start" ? "session" : "all_time", "data-model": model },
        el("td", { class: "muted" }, label), el("td", {}, model), el("td", {}, t.requests),
        el("td", {}, t.prompt_tokens), el("td", {}, t.cached_tokens), el("td", {}, pct(t.cache_efficiency)),
        el("td", {}, t.generation_tokens), el("td", {}, num(t.avg_prefill_tps)), el("td", {}, num(t.avg_decode_tps))));
    }
  }
  return el("table", { id: "totals-table" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

$("#clear-session-stats").addEventListener("click", () => api("POST", "/admin/api/stats/clear", { all_time: false }));
$("#clear-all-stats").addEventListener("click", () => {
  if (confirm("Clear the all-time totals too?")) api("POST", "/admin/api/stats/clear", { all_time: true });
});

// ------------------------------------------------------------------ models
function showModels() {
  every(2000, refreshModels);
}

async function refreshModels() {
  let status;
  try {
    status = await api("GET", "/v1/models/status");
    showError($("#models-error"), null);
  } catch (error) { return showError($("#models-error"), error); }
  state.models = status.models;
  const rows = [];
  for (const m of status.models) {
    const badges = [
      m.loading ? el("span", { class: "badge loading" }, "loading")
        : el("span", { class: "badge " + (m.loaded ? "loaded" : "unloaded") }, m.loaded ? "loaded" : "not loaded"),
      m.pinned ? el("span", { class: "badge pinned" }, "pinned") : null,
      m.alias ? el("span", { class: "badge" }, "alias: " + m.alias) : null,
      m.active_requests ? el("span", { class: "badge" }, m.active_requests + " active") : null,
    ];
    const action = m.loaded
      ? el("button", { class: "small secondary", "data-action": "unload", onclick: () => modelAction(m.id, "unload") }, "Unload")
      : el("button", { class: "small", "data-action": "load", disabled: m.loading, onclick: () => modelAction(m.id, "load") }, "Load");
    rows.push(el("tr", { "data-model-id": m.id },
      el("td", {}, m.id), el("td", {}, m.model_type), el("td", {}, bytes(m.size_bytes)),
      el("td", {}, m.quantization || "–"), el("td", {}, m.format || "–"), el("td", {}, m.max_context_window),
      el("td", { class: "badges" }, badges),
      el("td", {}, action, " ", el("button", { class: "small secondary", "data-action": "settings",
                                           onclick: () => toggleSettings(m.id) }, "Settings"))));
    if (state.editing.has(m.id)) {
      const existing = document.querySelector(`tr.settings-row[data-model-id="${CSS.escape(m.id)}"]`);
      rows.push(existing || settingsRow(m));
    }
  }
  $("#models-table tbody").replaceChildren(...rows);
  $("#unavailable").replaceChildren(...(status.unavailable.length
    ? status.unavailable.map((u) => el("li", {}, el("code", {}, u.path), " – ", u.reason))
    : [el("li", { class: "muted" }, "none")]));
}

async function modelAction(id, action) {
  const row = document.querySelector(`tr[data-model-id="${CSS.escape(id)}"] .badges`);
  if (row && action === "load") row.replaceChildren(el("span", { class: "badge loading" }, "loading"));
  try {
    await api("POST", `/v1/models/${encodeURI(id)}/${action}`);
    showError($("#models-error"), null);
  } catch (error) { showError($("#models-error"), error); }
  await refreshModels();
}

function toggleSettings(id) {
  if (state.editing.has(id)) state.editing.delete(id); else state.editing.add(id);
  refreshModels();
}

const SETTING_FIELDS = [
  ["alias", "text", "Alias"], ["ttl", "number", "TTL (s)"], ["max_tokens", "number", "Max tokens"],
  ["max_context_window", "number", "Max context"], ["temperature", "number", "Temperature", "sampling"],
  ["top_p", "number", "Top p", "sampling"], ["kv_bits", "select", "KV bits"],
];

function settingsRow(model) {
  const form = el("form", { class: "settings-form", "data-model-id": model.id });
  const error = el("p", { class: "error", hidden: true });
  const saved = el("span", { class: "muted" });
  form.append(el("span", { class: "muted" }, "loading settings…"));
  api("GET", `/v1/models/${encodeURI(model.id)}/settings`).then(({ settings }) => {
    const inputs = {};
    const controls = SETTING_FIELDS.map(([key, type, label, group]) => {
      const current = group ? (settings[group] || {})[key] : settings[key];
      let input;
      if (type === "select") {
        input = el("select", { name: key }, ["", "4", "8"].map((v) => el("option", { value: v, selected: String(current ?? "") === v }, v || "off")));
      } else {
        input = el("input", { name: key, type, step: "any", value: current ?? "" });
      }
      inputs[key] = [input, type, group];
      return el("label", {}, label, input);
    });
    const pinned = el("input", { type: "checkbox", name: "pinned", checked: !!settings.pinned });
    // Every other setting (tool parser, chat template kwargs, KV details...) as the JSON object
    // PUT /v1/models/{id}/settings takes: a key left out is removed.
    const raw = el("textarea", { name: "raw", rows: 6, spellcheck: "false" }, JSON.stringify(settings, null, 2));
    const saveRaw = el("button", { type: "button", class: "small", "data-action": "save-json" }, "Save JSON");
    saveRaw.onclick = async () => {
      let wanted;
      try {
        wanted = JSON.parse(raw.value);
        if (!wanted || typeof wanted !== "object" || Array.isArray(wanted)) throw new Error("expected a JSON object");
      } catch (e) { return showError(error, new Error("the settings are not a JSON object: " + e.message)); }
      const patch = { ...wanted };
      for (const key of Object.keys(settings)) if (!(key in wanted)) patch[key] = null;
      await save(patch);
    };
    form.replaceChildren(...controls, el("label", {}, "Pinned", pinned),
                         el("button", { type: "submit", "data-action": "save-settings" }, "Save"), saved,
                         el("details", { class: "raw-settings" }, el("summary", {}, "All settings (JSON)"), raw, saveRaw));
    async function save(patch) {
      try {
        const result = await api("PUT", `/v1/models/${encodeURI(model.id)}/settings`, patch);
        for (const key of Object.keys(settings)) delete settings[key];
        Object.assign(settings, result.settings);
        raw.value = JSON.stringify(settings, null, 2);
        showError(error, result.load_error ? new Error(result.load_error) : null);
        saved.textContent = "saved";
        setTimeout(() => saved.textContent = "", 2000);
      } catch (e) { showError(error, e); saved.textContent = ""; }
      refreshModels();
    }
    form.onsubmit = async (event) => {
      event.preventDefault();
      const patch = { pinned: pinned.checked };
      const sampling = { ...(settings.sampling || {}) };
      for (const [key, [input, type, group]] of Object.entries(inputs)) {
        const raw = input.value.trim();
        const value = raw === "" ? null : (type === "text" ? raw : Number(raw));
        if (group) { if (value === null) delete sampling[key]; else sampling[key] = value; }
        else patch[key] = value;
      }
      patch.sampling = Object.keys(sampling).length ? sampling : null;
      await save(patch);
    };
  }).catch((e) => showError(error, e));
  return el("tr", { class: "settings-row", "data-model-id": model.id }, el("td", { colspan: 8 }, form, error));
}

// ------------------------------------------------------------------ downloader
function showDownloader() {
  every(1000, refreshTasks);
}

$("#hf-search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError($("#hf-error"), null);
  $("#hf-results").replaceChildren(el("li", { class: "muted" }, "searching…"));
  try {
    const result = await api("GET", "/admin/api/hf/search?q=" + encodeURIComponent($("#hf-query").value));
    $("#hf-results").replaceChildren(...(result.models.length ? result.models.map((m) => el("li", {},
      el("button", { class: "link", "data-repo": m.id, onclick: () => showFiles(m.id) }, m.id), " ",
      el("span", { class: "muted" }, [m.pipeline_tag, m.downloads != null ? m.downloads + " downloads" : null].filter(Boolean).join(", "))))
      : [el("li", { class: "muted" }, "no models found")]));
  } catch (error) {
    $("#hf-results").replaceChildren();
    showError($("#hf-error"), error);
  }
});

async function showFiles(repo) {
  state.selectedRepo = repo;
  showError($("#hf-error"), null);
  try {
    const result = await api("GET", "/admin/api/hf/files?repo=" + encodeURIComponent(repo));
    $("#hf-files-title").textContent = repo;
    $("#hf-files tbody").replaceChildren(...result.files.map((f) => el("tr", {},
      el("td", {}, f.path), el("td", {}, bytes(f.size)), el("td", {}, f.download ? "yes" : "no (not needed to serve)"))));
    $("#hf-download-size").textContent = bytes(result.download_bytes) + " to download";
    $("#hf-files").hidden = false;
  } catch (error) { showError($("#hf-error"), error); }
}

$("#hf-download").addEventListener("click", async () => {
  try {
    await api("POST", "/admin/api/hf/download", { repo_id: state.selectedRepo, model_dir: $("#hf-model-dir").value || undefined });
    refreshTasks();
  } catch (error) { showError($("#hf-error"), error); }
});

async function refreshTasks() {
  let result;
  try { result = await api("GET", "/admin/api/hf/tasks"); } catch (e) { return; }
  // Where a download goes: a choice only when the server has several model dirs.
  const dirs = $("#hf-model-dir");
  if (dirs.options.length !== result.model_dirs.length) {
    dirs.replaceChildren(...result.model_dirs.map((d) => el("option", { value: d }, d)));
  }
  $("#hf-model-dir-label").hidden = result.model_dirs.length < 2;
  $("#hf-tasks").replaceChildren(...(result.tasks.length ? result.tasks.slice().reverse().map((t) => el("div", { class: "task", "data-task": t.id, "data-status": t.status },
    el("strong", {}, t.repo_id), " ", el("span", { class: "badge" }, t.status),
    el("div", { class: "bar" }, el("div", { style: "width:" + (t.progress * 100).toFixed(1) + "%" })),
    el("span", { class: "muted" }, bytes(t.downloaded_bytes) + " / " + bytes(t.total_bytes) + " → " + t.dest),
    t.error ? el("p", { class: "error" }, t.error) : null,
    t.status === "downloading" ? el("button", { class: "small secondary", onclick: () => api("POST", `/admin/api/hf/cancel/${t.id}`).then(refreshTasks) }, "Cancel") : null,
    t.status === "cancelled" || t.status === "failed" ? el("button", { class: "small", onclick: () => api("POST", `/admin/api/hf/resume/${t.id}`).then(refreshTasks) }, "Resume") : null))
    : [el("p", { class: "muted" }, "none yet")]));
}

// ------------------------------------------------------------------ chat
async function showChat() {
  await refreshChatModels();
  renderChat();
}

async function refreshChatModels() {
  try {
    const status = await api("GET", "/v1/models/status");
    const select = $("#chat-model");
    const current = select.value;
    // Text models, and omni models (which take an audio clip with the message).
    const llms = status.models.filter((m) => m.model_type === "llm" || (m.audio && m.model_type !== "stt"));
    select.replaceChildren(...llms.map((m) => el("option", { value: m.id, selected: m.id === current, "data-audio": m.audio ? "1" : "" },
                                                 m.id + (m.audio ? " (audio)" : "") + (m.loaded ? "" : " (not loaded)"))));
    showAudioAttach();
  } catch (error) { showError($("#chat-error"), error); }
}

function renderChat() {
  const log = $("#chat-log");
  log.replaceChildren(...state.chat.map(messageNode));
  log.scrollTop = log.scrollHeight;
}

function messageNode(message) {
  const body = el("div", { class: "body" });
  if (message.role === "user") body.textContent = message.content;
  else {
    if (message.reasoning) body.append(el("details", { class: "reasoning", open: message.streaming }, el("summary", {}, "Reasoning"), el("div", { class: "reasoning-text" }, message.reasoning)));
    const text = el("div", { class: "content" });
    text.innerHTML = window.renderMarkdown(message.content || "");
    body.append(text);
    for (const call of message.tool_calls || []) {
      body.append(el("div", { class: "tool-call" }, "tool call: " + (call.function.name || "") + "(" + (call.function.arguments || "") + ")"));
    }
  }
  return el("div", { class: "msg " + message.role }, el("div", { class: "who" }, message.role === "user" ? "you" : message.model || "assistant"), body);
}

function showAudioAttach() {
  const option = $("#chat-model").selectedOptions[0];
  $("#chat-audio-box").hidden = !(option && option.dataset.audio);
  if ($("#chat-audio-box").hidden) $("#chat-audio").value = "";
}
$("#chat-model").addEventListener("change", showAudioAttach);

// A clip attached to the message: an OpenAI input_audio part (base64 and the file's format).
async function audioPart(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  const format = (file.name.split(".").pop() || "wav").toLowerCase();
  return { type: "input_audio", input_audio: { data: btoa(binary), format } };
}

$("#chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("#chat-form").requestSubmit(); }
});
$("#chat-clear").addEventListener("click", () => { state.chat = []; renderChat(); });
$("#chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("#chat-input").value.trim();
  const model = $("#chat-model").value;
  if (!text || !model || state.chatAbort) return;
  let tools = null;
  const toolsText = $("#chat-tools").value.trim();
  if (toolsText) {
    try { tools = JSON.parse(toolsText); } catch (error) {
      return showError($("#chat-error"), new Error("the tools are not valid JSON: " + error.message));
    }
  }
  const clip = $("#chat-audio").files[0];
  const parts = clip ? [await audioPart(clip), { type: "text", text }] : null;
  $("#chat-input").value = "";
  $("#chat-audio").value = "";
  showError($("#chat-error"), null);
  state.chat.push({ role: "user", content: clip ? text + " [clip: " + clip.name + "]" : text, parts });
  const reply = { role: "assistant", model, content: "", reasoning: "", tool_calls: [], streaming: true };
  const history = state.chat.map((m) => m.role === "user" ? { role: "user", content: m.parts || m.content }
                                                          : { role: "assistant", content: m.content || "" });
  state.chat.push(reply);
  renderChat();
  state.chatAbort = new AbortController();
  $("#chat-send").hidden = true;
  $("#chat-stop").hidden = false;
  try {
    await streamChat(model, history, tools, reply, state.chatAbort.signal);
  } catch (error) {
    if (error.name !== "AbortError") showError($("#chat-error"), error);
  } finally {
    reply.streaming = false;
    state.chatAbort = null;
    if (state.tab === "chat") refreshChatModels();
    $("#chat-send").hidden = false;
    $("#chat-stop").hidden = true;
    renderChat();
  }
});

async function streamChat(model, messages, tools, reply, signal) {
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers, credentials: "same-origin", signal,
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true },
                           ...(tools ? { tools } : {}) }),
  });
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError((data && data.error && data.error.message) || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") continue;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new ApiError(chunk.error.message || "the server ended the stream with an error");
        for (const choice of chunk.choices || []) applyDelta(reply, choice.delta || {});
        if (chunk.usage) reply.usage = chunk.usage;
      }
    }
    renderChat();
  }
}

function applyDelta(reply, delta) {
  if (delta.content) reply.content += delta.content;
  if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
  for (const call of delta.tool_calls || []) {
    const slot = reply.tool_calls[call.index] || (reply.tool_calls[call.index] = { function: { name: "", arguments: "" } });
    if (call.function && call.function.name) slot.function.name += call.function.name;
    if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
  }
}

// ------------------------------------------------------------------ logs
function showLogs() {
  const lines = $("#log-lines");
  lines.replaceChildren();
  const level = $("#log-level").value;
  const source = new EventSource("/admin/api/logs/stream?level=" + encodeURIComponent(level));
  state.logSource = source;
  source.onopen = () => $("#log-state").textContent = "live";
  source.onerror = () => $("#log-state").textContent = "reconnecting…";
  source.onmessage = (event) => {
    const record = JSON.parse(event.data);
    const stick = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 20;
    const time = new Date(record.time * 1000).toISOString().replace("T", " ").slice(0, 23);
    lines.append(el("div", { class: "log-" + record.level },
      `${time} ${record.level.toUpperCase()} ${record.logger}: ${record.message}`));
    while (lines.childElementCount > 2000) lines.firstElementChild.remove();
    if (stick) lines.scrollTop = lines.scrollHeight;
  };
}
$("#log-level").addEventListener("change", () => { if (state.tab === "logs") { stopTab(); showLogs(); } });

start().catch((error) => { document.body.append(el("p", { class: "error" }, "The panel could not start: " + error.message)); });
