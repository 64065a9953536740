// The pages' one way to the JSON API: the API key, JSON calls and server-sent event streams.
//
// The key comes from /api/admin/api-key, which answers only clients on this machine
// (loopback); elsewhere the user pastes it. It is kept for this tab only (sessionStorage).
// Streams are read with fetch, not EventSource, because they need the Authorization header.

const KEY_STORAGE = "swarm-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function hasKey() {
  return Boolean(apiKey);
}

export function setKey(key) {
  apiKey = key.trim();
  if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
  else sessionStorage.removeItem(KEY_STORAGE);
}

// The key from this machine's node, when the page is opened from this machine.
// Resolves to the key, or "" when the node gives it only to loopback clients.
export async function loopbackKey() {
  try {
    const reply = await fetch("/api/admin/api-key");
    if (reply.ok) return (await reply.json()).api_key || "";
  } catch (error) {
    // The control plane is restarting: the caller shows the node as down.
  }
  return "";
}

export async function ensureKey() {
  if (!apiKey) setKey(await loopbackKey());
  return hasKey();
}

function headers(extra) {
  return { ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}), ...extra };
}

async function errorOf(reply) {
  let message = `${reply.status} ${reply.statusText}`;
  try {
    const body = await reply.json();
    message = (body.error && (body.error.message || body.error)) || body.message || message;
  } catch (error) {
    // Not JSON: the status line says enough.
  }
  return new ApiError(String(message), reply.status);
}

// One JSON call: resolves to the parsed body, rejects with ApiError (status 0: no answer).
export async function api(path, { method = "GET", body, signal } = {}) {
  let reply;
  try {
    reply = await fetch(path, {
      method,
      signal,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(error.message, 0);
  }
  if (!reply.ok) throw await errorOf(reply);
  return reply.json();
}

// A server-sent event stream as an async iterator of { event, data } (data parsed as JSON
// unless it is OpenAI's "[DONE]"). Ends when the server ends the stream; abort `signal` to stop.
export async function* events(path, { method = "GET", body, signal } = {}) {
  const reply = await fetch(path, {
    method,
    signal,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!reply.ok) throw await errorOf(reply);
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const frames = buffer.split("\n\n");
      buffer = frames.pop();
      for (const frame of frames) {
        let event = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (!data.length) continue; // a keep-alive comment
        const text = data.join("\n");
        yield { event, data: text === "[DONE]" ? text : JSON.parse(text) };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// The OpenAI chat stream: calls onText(delta) per chunk; resolves to { text, usage, finish }.
export async function streamChat({ model, messages, maxTokens, temperature, signal, onText }) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  if (maxTokens) body.max_tokens = maxTokens;
  if (temperature !== undefined && temperature !== null) body.temperature = temperature;
  let text = "";
  let usage = null;
  let finish = null;
  for await (const { data } of events("/v1/chat/completions", { method: "POST", body, signal })) {
    if (data === "[DONE]") break;
    if (data.error) throw new ApiError(data.error.message, 500);
    if (data.usage) usage = data.usage;
    const choice = data.choices && data.choices[0];
    if (!choice) continue;
    if (choice.finish_reason) finish = choice.finish_reason;
    const delta = choice.delta && choice.delta.content;
    if (delta) {
      text += delta;
      onText(delta, text);
    }
  }
  return { text, usage, finish };
}

// The ids this node serves (without the claude-swarm-* aliases it also answers to).
export async function servedModels() {
  // This node's model first, then the models peers serve whole (owned_by "network"), which
  // this node hands requests to.
  const listed = await api("/v1/models");
  return listed.data.filter((model) => model.display_name === model.id);
}

// A model picker's label: network models say they come from the network.
export function modelLabel(model, t) {
  return model.owned_by === "network" ? t("chat.network_model", { model: model.id }) : model.id;
}
