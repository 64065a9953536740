// The dashboard's only script: polls the JSON APIs and streams chat replies over SSE.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("swarm-key") || "", model: "default", history: [] };

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function formatSeconds(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

async function findKey() {
  if (!state.key) {
    try {
      const reply = await fetch("/api/admin/api-key");
      if (reply.ok) state.key = (await reply.json()).api_key;
    } catch (error) { /* the node may be restarting; the form below still works */ }
  }
  if (state.key) {
    sessionStorage.setItem("swarm-key", state.key);
    $("key-status").textContent = "Using this node's API key (read from this machine).";
    $("key-form").hidden = true;
  } else {
    $("key-status").textContent = "This page is not on the node's machine: paste the API key from <data dir>/api_key.";
    $("key-form").hidden = false;
  }
}

async function refresh() {
  const badge = $("state");
  try {
    const reply = await fetch("/health/ready");
    const body = await reply.json();
    const node = body.node || {};
    const label = reply.ok ? "ready" : body.subsystems && body.subsystems.node ? "loading" : "down";
    badge.textContent = label;
    badge.className = `badge ${label}`;
    if (node.queue) $("queue").textContent = `${node.queue.active} / ${node.queue.waiting}`;
    if (node.totals) $("tokens").textContent = node.totals.generated_tokens.toLocaleString();
    if (node.uptime_s !== undefined) $("uptime").textContent = formatSeconds(node.uptime_s);
  } catch (error) {
    badge.textContent = "down";
    badge.className = "badge down";
  }
  if (state.key && $("model").textContent === "–") {
    const reply = await fetch("/v1/models", { headers: authHeaders() }).catch(() => null);
    if (reply && reply.ok) {
      const model = (await reply.json()).data[0];
      if (model) {
        state.model = model.id;
        $("model").textContent = model.id;
        $("context").textContent = model.context_length ? `${model.context_length.toLocaleString()} tokens` : "–";
      }
    }
  }
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  turn.textContent = text;
  $("transcript").appendChild(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  $("prompt").value = "";
  $("send").disabled = true;
  addTurn("user", prompt);
  state.history.push({ role: "user", content: prompt });
  const turn = addTurn("assistant", "");
  const started = performance.now();
  let first = 0, tokens = 0, text = "";
  try {
    const reply = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true, max_tokens: 512 }),
    });
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const raw of events) {
        if (!raw.startsWith("data: ") || raw === "data: [DONE]") continue;
        const chunk = JSON.parse(raw.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) {
          if (!first) first = performance.now();
          tokens += 1;
          text += delta;
          turn.textContent = text;
        }
      }
    }
    state.history.push({ role: "assistant", content: text });
    const seconds = (performance.now() - (first || started)) / 1000;
    $("chat-stats").textContent =
      `first token after ${((first || performance.now()) - started).toFixed(0)} ms · ` +
      `${tokens} chunks · ${(tokens / Math.max(seconds, 1e-3)).toFixed(1)} chunks/s`;
  } catch (error) {
    turn.className = "turn error";
    turn.textContent = `Error: ${error.message}`;
    state.history.pop();
  } finally {
    $("send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("base").textContent = `${location.origin}/v1`;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    findKey();
  });
  $("chat-form").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  findKey().then(refresh);
  setInterval(refresh, 2000);
});
