// gptkit's chat page: plain JavaScript, no build step. Conversations and settings live in this
// browser's localStorage; replies stream from /v1/chat/completions. Model output is Markdown,
// rendered by marked with raw HTML escaped, then sanitized by DOMPurify: it is never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) {
    try { const v = localStorage.getItem("gptkit." + key); return v === null ? fallback : JSON.parse(v); }
    catch { return fallback; }
  },
  set(key, value) { localStorage.setItem("gptkit." + key, JSON.stringify(value)); },
};

const FIELDS = ["system", "temperature", "top_p", "max_tokens", "seed"];
let server = { model: null, context: null, defaults: { temperature: 0.8, top_p: 1, max_tokens: 256, system: "", seed: "" } };
let chats = store.get("chats", {});      // id -> {id, title, messages: [{role, content, stats}], updated}
let current = store.get("current", null);
let busy = null;                          // {controller, out} while a reply streams

// --- Markdown, safely ---

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
marked.use({ gfm: true, breaks: true, renderer: { html(token) { return escapeHtml(token.raw ?? token.text ?? ""); } } });

function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["style", "form", "input", "textarea"] });
  for (const a of el.querySelectorAll("a")) { a.target = "_blank"; a.rel = "noopener noreferrer"; }
  for (const pre of el.querySelectorAll("pre")) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "copy"; b.textContent = "Copy";
    b.onclick = () => copyText(pre.querySelector("code")?.textContent ?? pre.textContent, b);
    pre.appendChild(b);
  }
}

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); }
  catch {  // no clipboard API (plain http on another host): the old way
    const t = document.createElement("textarea"); t.value = text; document.body.appendChild(t);
    t.select(); document.execCommand("copy"); t.remove();
  }
  button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

// --- conversations ---

const chat = () => chats[current];
function save() { store.set("chats", chats); store.set("current", current); }
function newChat() {
  current = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  chats[current] = { id: current, title: "New chat", messages: [], updated: Date.now() };
  save(); draw();
}
function touch() {
  const c = chat(); c.updated = Date.now();
  const first = c.messages.find((m) => m.role === "user");
  c.title = first ? first.content.slice(0, 60) : "New chat";
  save(); drawList();
}

function drawList() {
  const ul = $("chats"); ul.textContent = "";
  for (const c of Object.values(chats).sort((a, b) => b.updated - a.updated)) {
    const li = document.createElement("li"); li.dataset.id = c.id;
    if (c.id === current) li.className = "current";
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = c.title; open.title = c.title;
    open.onclick = () => { if (busy) return; current = c.id; save(); draw(); $("sidebar").classList.remove("open"); };
    const del = document.createElement("button");
    del.type = "button"; del.className = "link delete"; del.textContent = "×"; del.title = "delete";
    del.onclick = () => { if (busy) return; delete chats[c.id]; if (current === c.id) current = null; save(); draw(); };
    li.append(open, del); ul.appendChild(li);
  }
}

function statsText(s) {
  if (!s) return "";
  const parts = [`${s.tokens} tokens`];
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft_ms != null) parts.push(`first token ${Math.round(s.ttft_ms)} ms`);
  if (s.stopped) parts.push("stopped");
  else if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function bubble(m, i) {
  const div = document.createElement("div");
  div.className = "msg " + m.role; div.dataset.index = i;
  const who = document.createElement("div"); who.className = "who";
  who.append(m.role === "user" ? "You" : m.role === "assistant" ? "Assistant" : "Error");
  const body = document.createElement("div"); body.className = "body";
  if (m.role === "assistant") renderMarkdown(body, m.content); else body.textContent = m.content;
  div.append(who, body);
  if (m.role === "assistant") {
    const st = document.createElement("div"); st.className = "stats"; st.textContent = statsText(m.stats);
    div.appendChild(st);
  }
  return div;
}

function draw() {
  if (!chat()) { const ids = Object.keys(chats); if (ids.length) current = ids[0]; else return newChat(); }
  const log = $("log"); log.textContent = "";
  const c = chat();
  if (!c.messages.length) {
    const e = document.createElement("div"); e.className = "empty";
    e.textContent = "Start the conversation below."; log.appendChild(e);
  }
  c.messages.forEach((m, i) => log.appendChild(bubble(m, i)));
  if (c.dropped) note(c.dropped);
  addActions(); drawList(); log.scrollTop = log.scrollHeight;
}

function note(n) {
  let el = document.querySelector("#log .note");
  if (!el) { el = document.createElement("div"); el.className = "note"; }
  el.textContent = `${n} earlier message${n === 1 ? " was" : "s were"} left out of the last request to fit the model's context of ${server.context ?? "?"} tokens.`;
  $("log").appendChild(el);
}

function addActions() {  // edit on user turns, regenerate on the last reply
  const c = chat();
  for (const div of document.querySelectorAll("#log .msg")) {
    const i = +div.dataset.index, m = c.messages[i], who = div.querySelector(".who");
    if (!m) continue;
    if (m.role === "user") {
      const b = document.createElement("button"); b.type = "button"; b.className = "link edit"; b.textContent = "edit";
      b.onclick = () => editTurn(i, div); who.appendChild(b);
    } else if (m.role === "assistant" && i === c.messages.length - 1) {
      const b = document.createElement("button"); b.type = "button"; b.className = "link regenerate"; b.textContent = "regenerate";
      b.onclick = () => { if (busy) return; c.messages.pop(); touch(); draw(); send(); }; who.appendChild(b);
    }
  }
}

function editTurn(i, div) {
  if (busy) return;
  const c = chat(), body = div.querySelector(".body");
  const box = document.createElement("textarea"); box.className = "edit-box"; box.value = c.messages[i].content;
  const ok = document.createElement("button"); ok.type = "button"; ok.className = "primary save-edit"; ok.textContent = "Send";
  const cancel = document.createElement("button"); cancel.type = "button"; cancel.textContent = "Cancel";
  body.replaceWith(box); div.append(ok, cancel); box.focus();
  cancel.onclick = draw;
  ok.onclick = () => {
    const text = box.value.trim(); if (!text) return;
    c.messages = c.messages.slice(0, i); c.messages.push({ role: "user", content: text }); c.dropped = 0;
    touch(); draw(); send();
  };
}

// --- settings ---

function settings() { return { ...server.defaults, ...store.get("settings", {}) }; }
function drawSettings() { const s = settings(); for (const f of FIELDS) $(f).value = s[f] ?? ""; }
function readSettings() {
  const s = {};
  for (const f of FIELDS) s[f] = $(f).value;
  store.set("settings", s);
}

// --- the server ---

function headers() {
  const h = { "Content-Type": "application/json" }, k = store.get("key", "");
  if (k) h.Authorization = "Bearer " + k;
  return h;
}

function askKey(why) {
  $("key-why").textContent = why; $("keybox").hidden = false; $("key").focus();
}

async function connect() {
  let r;
  try { r = await fetch("v1/models", { headers: headers() }); }
  catch { $("model").textContent = "server unreachable"; return false; }
  if (r.status === 401) {
    askKey(store.get("key", "") ? "The server refused this API key (401). Enter the key it was started with (--api-key or GPTKIT_API_KEY)."
                                 : "This server asks for an API key (it was started with --api-key or GPTKIT_API_KEY). Enter it to chat.");
    $("model").textContent = "API key needed"; return false;
  }
  if (!r.ok) { $("model").textContent = `server error ${r.status}`; return false; }
  const m = (await r.json()).data[0];
  server.model = m.id; server.context = m.context_length ?? null;
  if (m.defaults) server.defaults = { ...server.defaults, ...m.defaults, system: "", seed: "" };
  $("keybox").hidden = true;
  $("model").textContent = `${m.id}${server.context ? ` · context ${server.context} tokens` : ""}`;
  $("settings-note").textContent = `server defaults: temperature ${server.defaults.temperature}, top-p ${server.defaults.top_p}, max tokens ${server.defaults.max_tokens}`;
  drawSettings();
  if (!busy) draw();  // a note drawn before the context was known
  return true;
}

function explain(status, body) {
  const detail = body?.error?.message ?? "";
  if (status === 401) return "The server refused the API key (401 Unauthorized). Enter the key it was started with above, then send again.";
  if (status === 429) return "The server is busy (429: its queue is full). Wait a moment and send again.";
  if (status === 400) return `The server refused the request (400): ${detail}`;
  if (status === 404) return `Not found (404): ${detail}`;
  return `The server answered ${status}${detail ? ": " + detail : ""}.`;
}

function showError(text) {
  const div = bubble({ role: "error", content: text }, -1); $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
}

function setBusy(on) {
  $("send").hidden = on; $("stop").hidden = !on;
  for (const b of document.querySelectorAll("#log .edit, #log .regenerate")) b.disabled = on;
}

// Send the conversation (ending with a user turn) and stream the reply into a new bubble.
async function send() {
  const c = chat(); if (busy || !c.messages.length) return;
  if (!server.model && !(await connect())) {
    const last = c.messages.pop(); touch(); draw(); $("msg").value = last.content;
    showError($("keybox").hidden ? "Cannot reach the server. Is `gptkit serve` still running?"
                                 : "The server needs its API key (401): enter it above, then send again.");
    return;
  }
  const s = settings(), msgs = c.messages.filter((m) => m.role !== "error").map(({ role, content }) => ({ role, content }));
  if (s.system.trim()) msgs.unshift({ role: "system", content: s.system });
  const body = { model: server.model, messages: msgs, stream: true, stream_options: { include_usage: true }, truncate: "oldest_turns" };
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.top_p !== "") body.top_p = Number(s.top_p);
  if (s.max_tokens !== "") body.max_tokens = Number(s.max_tokens);
  if (s.seed !== "" && s.seed != null) body.seed = Number(s.seed);

  const controller = new AbortController();
  const reply = { role: "assistant", content: "", stats: { tokens: 0 } };
  const div = bubble(reply, c.messages.length), out = div.querySelector(".body"), st = div.querySelector(".stats");
  $("log").querySelector(".empty")?.remove();
  $("log").appendChild(div); div.dataset.done = "0";
  busy = { controller, div }; setBusy(true);
  const t0 = performance.now(); let first = null, finish = null, usage = null, dirty = false, failed = null;
  const paint = () => { dirty = false; renderMarkdown(out, reply.content); $("log").scrollTop = $("log").scrollHeight; };
  try {
    const r = await fetch("v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let err = null; try { err = await r.json(); } catch { /* not JSON */ }
      if (r.status === 401) askKey("The server refused the API key (401). Enter the key it was started with (--api-key or GPTKIT_API_KEY).");
      throw Object.assign(new Error(explain(r.status, err)), { http: r.status });
    }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6); if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error("The model failed: " + obj.error.message);
        if (obj.truncated_messages != null) c.dropped = obj.truncated_messages;
        if (obj.usage) usage = obj.usage;
        const ch = obj.choices?.[0]; if (!ch) continue;
        const delta = ch.delta?.content ?? "";
        if (delta) { if (first === null) first = performance.now(); reply.content += delta; if (!dirty) { dirty = true; requestAnimationFrame(paint); } }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") failed = e.http ? e.message : (e instanceof TypeError ? "Cannot reach the server (the connection failed). Is `gptkit serve` still running?" : e.message);
  }
  const end = performance.now(), stopped = controller.signal.aborted;
  busy = null; setBusy(false); div.dataset.done = "1";
  if (failed && !reply.content) {  // nothing came: take the turn back into the input box
    div.remove();
    const last = c.messages[c.messages.length - 1];
    if (last?.role === "user") { c.messages.pop(); if (!$("msg").value) $("msg").value = last.content; }
    touch(); draw(); showError(failed); return;
  }
  const tokens = usage?.completion_tokens ?? null;
  reply.stats = { tokens: tokens ?? "?", ttft_ms: first === null ? null : first - t0, finish, stopped };
  // Decoding speed: the tokens after the first over the time after it; when the whole reply came in one read
  // (a fast model, a short reply) that time is zero, and the rate is taken over the whole reply from the request.
  if (tokens && first !== null) {
    const span = tokens > 1 && end - first > 0 ? [tokens - 1, end - first] : [tokens, end - t0];
    if (span[1] > 0) reply.stats.tps = span[0] / (span[1] / 1000);
  }
  paint(); st.textContent = statsText(reply.stats);
  c.messages.push(reply); touch(); draw();
  if (failed) showError(failed);
}

function stop() { if (busy) busy.controller.abort(); }

// --- wiring ---

$("composer").onsubmit = (e) => {
  e.preventDefault();
  const text = $("msg").value.trim(); if (!text || busy) return;
  $("msg").value = ""; resize();
  chat().messages.push({ role: "user", content: text }); touch(); draw(); send();
};
$("msg").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
const resize = () => { const m = $("msg"); m.style.height = "auto"; m.style.height = Math.min(m.scrollHeight + 2, 192) + "px"; };
$("msg").addEventListener("input", resize);
document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
$("stop").onclick = stop;
$("new-chat").onclick = () => { if (!busy) { newChat(); $("sidebar").classList.remove("open"); $("msg").focus(); } };
$("toggle-chats").onclick = () => $("sidebar").classList.toggle("open");
$("close-chats").onclick = () => $("sidebar").classList.remove("open");
$("toggle-settings").onclick = () => {
  const s = $("settings"); s.hidden = !s.hidden; $("toggle-settings").setAttribute("aria-expanded", String(!s.hidden));
};
for (const f of FIELDS) $(f).addEventListener("change", readSettings);
$("defaults").onclick = () => { store.set("settings", {}); drawSettings(); };
$("key-save").onclick = async () => { store.set("key", $("key").value.trim()); $("key").value = ""; await connect(); };
$("key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); $("key-save").click(); } });

if (matchMedia("(max-width: 760px)").matches) $("msg").placeholder = "Message";
drawSettings(); draw(); connect(); $("msg").focus();
