// Models: per model, the layers and shards held here and by peers, what is missing here
// and its size, pin and unpin, download. Everything from /api/dashboard/models.
import { api } from "./api.js";
import { clear, formatBytes, formatNumber, h, layerRange, notice, pullProgress, shortId, table } from "./dom.js";
import { t } from "./i18n.js";

const REFRESH_MS = 5000;

function coverageBar(model) {
  if (!model.coverage) return h("p", { class: "hint" }, t("models.no_layers"));
  const cells = model.coverage.map((layer, index) => {
    const kind = layer.here ? (layer.peers ? "both" : "here") : layer.peers ? "peers" : "none";
    const label = t(`models.layer.${kind}`, { layer: index, peers: layer.peers });
    return h("span", { class: `cell ${kind === "both" ? "here both" : kind}`, title: label });
  });
  const here = model.coverage.filter((layer) => layer.here).length;
  const peers = model.coverage.filter((layer) => !layer.here && layer.peers).length;
  const none = model.coverage.length - here - peers;
  const summary = t("models.coverage_summary", { here, peers, none, total: model.coverage.length });
  return h(
    "figure",
    { class: "coverage" },
    h("div", { class: "bar", role: "img", "aria-label": summary }, ...cells),
    h(
      "figcaption",
      {},
      h("span", { class: "key here" }, t("models.legend.here")),
      h("span", { class: "key both" }, t("models.legend.both")),
      h("span", { class: "key peers" }, t("models.legend.peers")),
      h("span", { class: "key none" }, t("models.legend.none")),
      h("span", { class: "hint" }, summary),
    ),
  );
}

function holders(model) {
  const rows = [];
  for (const layers of model.layers_here) {
    rows.push(h("tr", { class: "self" }, h("td", {}, t("models.this_node")), h("td", {}, layerRange(layers)), h("td", {}, "–")));
  }
  for (const peer of model.peers) {
    rows.push(
      h(
        "tr",
        {},
        h("td", {}, h("code", { title: peer.peer_id }, shortId(peer.peer_id)), " ", h("span", { class: "hint" }, peer.address || "")),
        h("td", {}, layerRange(peer.layers)),
        h("td", {}, peer.latency_ms === null || peer.latency_ms === undefined ? "–" : t("common.ms", { ms: formatNumber(peer.latency_ms, 1) })),
      ),
    );
  }
  if (!rows.length) return h("p", { class: "hint" }, t("models.nobody"));
  return table({}, [t("models.holder"), t("models.layers"), t("models.latency")], rows, t("models.holders_caption", { model: model.id }));
}

function shards(model) {
  if (!model.shards) return null;
  const here = model.shards.filter((shard) => shard.here).length;
  return h(
    "details",
    {},
    h("summary", {}, t("models.shards", { here, total: model.shards.length })),
    h(
      "ul",
      { class: "shards" },
      ...model.shards.map((shard) =>
        h("li", { class: shard.here ? "here" : "missing" }, t(shard.here ? "models.shard_here" : "models.shard_missing", { index: shard.index, layers: layerRange(shard.layers), size: formatBytes(shard.size_bytes) })),
      ),
    ),
  );
}

export function render(view) {
  const state = { timer: null, stopped: false, busy: new Set() };
  const list = h("div", { class: "model-list", "aria-live": "polite" });
  const errors = h("div");
  view.append(h("h1", {}, t("models.title")), h("p", { class: "lead" }, t("models.lead")), errors, list);

  async function act(model, action) {
    state.busy.add(model.id);
    clear(errors);
    try {
      const path = `/api/dashboard/models/${encodeURIComponent(model.id)}`;
      if (action === "pin") await api(`${path}/pin`, { method: "PUT" });
      else if (action === "unpin") await api(`${path}/pin`, { method: "DELETE" });
      else if (action === "pull") await api(`${path}/pull`, { method: "POST" });
    } catch (error) {
      errors.append(notice(error.message));
    }
    state.busy.delete(model.id);
    refresh();
  }

  // How busy the served model is: its shared decode batch, and what its prefix cache saves.
  function load(model) {
    const parts = [];
    const batch = model.batch;
    if (batch) {
      parts.push(t("models.batch", { busy: batch.in_use, slots: batch.slots }));
      if (batch.steps) parts.push(t("models.batch_rows", { rows: batch.mean_rows.toFixed(1) }));
      if (batch.prompt_calls) {
        const prompts = batch.prompt_chunks / batch.prompt_calls;
        parts.push(t("models.batch_prompts", { prompts: prompts.toFixed(1) }));
      }
    }
    const prefix = model.prefix_cache;
    if (prefix) {
      parts.push(
        t("models.prefix_cache", {
          size: formatBytes(prefix.bytes),
          budget: formatBytes(prefix.budget_bytes),
          tokens: formatNumber(prefix.reused_tokens),
        }),
      );
    }
    return parts.length ? h("p", { class: "hint", "data-field": "load" }, parts.join(" · ")) : null;
  }

  function card(model) {
    const badges = [];
    if (model.served) badges.push(h("span", { class: `badge ${model.state || ""}` }, t(`models.serving.${model.state || "unknown"}`)));
    badges.push(h("span", { class: "badge" }, t(model.installed ? "models.installed" : "models.not_installed")));
    if (model.pinned) badges.push(h("span", { class: "badge pinned" }, t("models.pinned")));
    const facts = [];
    if (model.architecture) facts.push(model.architecture);
    if (model.n_layers) facts.push(t("models.n_layers", { count: model.n_layers }));
    if (model.context_length) facts.push(t("models.context", { tokens: formatNumber(model.context_length) }));
    if (model.size_bytes !== null) facts.push(t("models.size_here", { size: formatBytes(model.size_bytes) }));
    const missing =
      model.download_bytes === null ? t("models.download_unknown") : model.download_bytes === 0 ? t("models.download_none") : t("models.download_bytes", { size: formatBytes(model.download_bytes) });
    const busy = state.busy.has(model.id);
    const buttons = [
      h(
        "button",
        { type: "button", class: "ghost", "aria-pressed": model.pinned ? "true" : "false", disabled: busy, onclick: () => act(model, model.pinned ? "unpin" : "pin") },
        t(model.pinned ? "models.unpin" : "models.pin"),
      ),
    ];
    const pulling = model.pull && model.pull.state === "running";
    if (model.registered && !model.installed) {
      buttons.push(h("button", { type: "button", class: "primary", disabled: busy || pulling, onclick: () => act(model, "pull") }, t("models.download")));
    }
    return h(
      "article",
      { class: "card model", "data-model": model.id },
      h("header", { class: "model-head" }, h("h2", {}, model.id), h("div", { class: "badges" }, ...badges)),
      model.description ? h("p", { class: "hint" }, model.description) : null,
      model.error ? notice(model.error) : null,
      facts.length ? h("p", { class: "facts-line" }, facts.join(" · ")) : null,
      load(model),
      coverageBar(model),
      holders(model),
      shards(model),
      h("p", { class: "missing", "data-field": "download" }, missing),
      model.pull
        ? h(
            "p",
            { class: "hint", "data-field": "pull" },
            t(`setup.pull.${model.pull.state}`, { model: model.id }),
            " ",
            pullProgress(model.pull, t("setup.pull.running", { model: model.id })),
            " ",
            h("code", {}, model.pull.message || ""),
          )
        : null,
      h("div", { class: "actions" }, ...buttons),
    );
  }

  async function refresh() {
    clearTimeout(state.timer);
    try {
      const answer = await api("/api/dashboard/models");
      if (state.stopped) return;
      const focused = document.activeElement && document.activeElement.closest("[data-model]");
      const focusKey = focused ? [focused.dataset.model, document.activeElement.textContent] : null;
      list.replaceChildren(...answer.models.map(card));
      if (focusKey) {
        const again = [...list.querySelectorAll(`[data-model] button`)].find(
          (button) => button.closest("[data-model]").dataset.model === focusKey[0],
        );
        if (again) again.focus();
      }
    } catch (error) {
      if (state.stopped) return;
      clear(errors).append(notice(error.message));
    }
    state.timer = setTimeout(refresh, REFRESH_MS);
  }

  list.append(h("p", { class: "hint" }, t("common.loading")));
  refresh();
  return () => {
    state.stopped = true;
    clearTimeout(state.timer);
  };
}
