// Chat: streamed replies rendered as Markdown, a stop button, a model picker, and
// conversations kept in this browser (localStorage), never on the node.
import { modelLabel, servedModels, streamChat } from "./api.js";
import { clear, formatNumber, h, notice } from "./dom.js";
import { t } from "./i18n.js";
import { render as markdown } from "./markdown.js";

const STORE = "swarm-conversations";
const MAX_CONVERSATIONS = 50;
const MAX_TOKENS = 1024;

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(saved) ? saved : [];
  } catch (error) {
    return [];
  }
}

function save(conversations) {
  const kept = [...conversations].sort((a, b) => b.updated - a.updated).slice(0, MAX_CONVERSATIONS);
  localStorage.setItem(STORE, JSON.stringify(kept));
}

function newConversation(model) {
  return { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "", model, messages: [], updated: Date.now() };
}

export function render(view) {
  const state = { conversations: load(), current: null, controller: null, models: [], stopped: false };
  const list = h("ul", { class: "conversations" });
  const picker = h("select", { id: "chat-model" });
  const transcript = h("div", { class: "transcript", role: "log", "aria-live": "polite", "aria-label": t("chat.transcript") });
  const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: t("chat.placeholder") });
  const send = h("button", { type: "submit", class: "primary", id: "chat-send" }, t("chat.send"));
  const stop = h("button", { type: "button", class: "danger", id: "chat-stop", hidden: true }, t("chat.stop"));
  const stats = h("p", { class: "hint", id: "chat-stats", "aria-live": "polite" });
  const errors = h("div");
  const form = h(
    "form",
    { class: "composer" },
    h("label", { for: "chat-prompt", class: "visually-hidden" }, t("chat.prompt_label")),
    prompt,
    h("div", { class: "composer-actions" }, send, stop),
  );

  view.append(
    h("h1", { class: "visually-hidden" }, t("nav.chat")),
    h(
      "div",
      { class: "chat-layout" },
      h(
        "aside",
        { class: "card sidebar", "aria-label": t("chat.conversations") },
        h("button", { type: "button", class: "primary wide-button", onclick: () => select(null) }, t("chat.new")),
        h("h2", { class: "small-heading" }, t("chat.conversations")),
        list,
      ),
      h(
        "section",
        { class: "card chat-main" },
        h("div", { class: "toolbar" }, h("label", { for: "chat-model" }, t("chat.model")), picker),
        errors,
        transcript,
        form,
        stats,
      ),
    ),
  );

  function current() {
    return state.conversations.find((conversation) => conversation.id === state.current);
  }

  function renderList() {
    clear(list);
    const sorted = [...state.conversations].sort((a, b) => b.updated - a.updated);
    if (!sorted.length) list.append(h("li", { class: "hint" }, t("chat.none")));
    for (const conversation of sorted) {
      const title = conversation.title || t("chat.untitled");
      list.append(
        h(
          "li",
          { class: conversation.id === state.current ? "active" : "" },
          h("button", { type: "button", class: "link", "aria-current": conversation.id === state.current ? "true" : null, onclick: () => select(conversation.id) }, title),
          h("button", { type: "button", class: "icon", "aria-label": t("chat.delete", { title }), title: t("chat.delete", { title }), onclick: () => remove(conversation.id) }, "×"),
        ),
      );
    }
  }

  function turn(message) {
    const body = h("div", { class: "content" });
    if (message.role === "assistant") body.append(markdown(message.content));
    else body.textContent = message.content;
    const element = h("article", { class: `turn ${message.role}` }, h("h2", { class: "who" }, t(`chat.role.${message.role}`)), body);
    if (message.stopped) element.append(h("p", { class: "hint stopped" }, t("chat.stopped")));
    return element;
  }

  function renderTranscript() {
    clear(transcript);
    const conversation = current();
    if (!conversation || !conversation.messages.length) {
      transcript.append(h("p", { class: "hint empty" }, t("chat.empty")));
      return;
    }
    for (const message of conversation.messages) transcript.append(turn(message));
    transcript.scrollTop = transcript.scrollHeight;
  }

  function select(id) {
    if (state.controller) return; // finish or stop the reply first
    state.current = id;
    const conversation = current();
    if (conversation && state.models.some((model) => model.id === conversation.model)) picker.value = conversation.model;
    renderList();
    renderTranscript();
    prompt.focus();
  }

  function remove(id) {
    if (state.controller && id === state.current) return;
    state.conversations = state.conversations.filter((conversation) => conversation.id !== id);
    save(state.conversations);
    if (state.current === id) state.current = null;
    renderList();
    renderTranscript();
  }

  function streaming(on) {
    send.disabled = on;
    stop.hidden = !on;
    picker.disabled = on;
    if (on) stop.focus();
    else prompt.focus();
  }

  async function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || state.controller || !picker.value) return;
    clear(errors);
    let conversation = current();
    if (!conversation) {
      conversation = newConversation(picker.value);
      state.conversations.push(conversation);
      state.current = conversation.id;
    }
    conversation.model = picker.value;
    conversation.title = conversation.title || text.slice(0, 60);
    conversation.messages.push({ role: "user", content: text });
    conversation.updated = Date.now();
    prompt.value = "";
    renderList();
    renderTranscript();
    const reply = { role: "assistant", content: "" };
    const element = turn(reply);
    element.classList.add("streaming");
    const body = element.querySelector(".content");
    transcript.querySelector(".empty")?.remove();
    transcript.append(element);
    state.controller = new AbortController();
    streaming(true);
    stats.textContent = t("chat.waiting");
    const started = performance.now();
    let first = 0;
    let frame = 0;
    try {
      const history = conversation.messages.map(({ role, content }) => ({ role, content }));
      const result = await streamChat({
        model: conversation.model,
        messages: history,
        maxTokens: MAX_TOKENS,
        signal: state.controller.signal,
        onText: (delta, text) => {
          if (!first) first = performance.now();
          reply.content = text;
          if (!frame) {
            frame = requestAnimationFrame(() => {
              frame = 0;
              body.replaceChildren(markdown(reply.content));
              transcript.scrollTop = transcript.scrollHeight;
            });
          }
        },
      });
      reply.content = result.text;
      const seconds = (performance.now() - (first || started)) / 1000;
      const tokens = result.usage ? result.usage.completion_tokens : 0;
      // The prompt tokens the node's prefix cache supplied (an earlier turn's, or the same
      // question asked before), which is why such a first token comes sooner.
      const cached = result.usage?.prompt_tokens_details?.cached_tokens || 0;
      stats.textContent = t(cached ? "chat.stats_cached" : "chat.stats", {
        first: formatNumber((first || performance.now()) - started),
        tokens: formatNumber(tokens),
        rate: formatNumber(tokens / Math.max(seconds, 1e-3), 1),
        cached: formatNumber(cached),
        prompt: formatNumber(result.usage ? result.usage.prompt_tokens : 0),
      });
    } catch (error) {
      if (error.name === "AbortError") {
        reply.stopped = true;
        stats.textContent = t("chat.stopped_stats");
      } else {
        errors.append(notice(t("chat.error", { message: error.message })));
        stats.textContent = "";
      }
    } finally {
      cancelAnimationFrame(frame);
      state.controller = null;
      if (reply.content || reply.stopped) conversation.messages.push(reply);
      else conversation.messages.pop(); // the question failed: let the user send it again
      conversation.updated = Date.now();
      save(state.conversations);
      if (!state.stopped) {
        streaming(false);
        renderList();
        renderTranscript();
      }
    }
  }

  form.addEventListener("submit", submit);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
  });
  stop.addEventListener("click", () => state.controller && state.controller.abort());

  (async () => {
    try {
      state.models = await servedModels();
    } catch (error) {
      errors.append(notice(t("chat.no_models", { message: error.message })));
      state.models = [];
    }
    clear(picker);
    for (const model of state.models) picker.append(h("option", { value: model.id }, modelLabel(model, t)));
    send.disabled = !state.models.length;
    const latest = [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
    select(latest ? latest.id : null);
  })();

  renderList();
  renderTranscript();
  return () => {
    state.stopped = true;
    if (state.controller) state.controller.abort();
  };
}
