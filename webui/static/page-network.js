// Network map: this node and its peers, their layer ranges and latency, live from the
// server-sent event stream /api/dashboard/network/stream (a snapshot every few seconds).
import { events } from "./api.js";
import { formatNumber, formatSeconds, h, layerRange, notice, shortId, svg, table } from "./dom.js";
import { t } from "./i18n.js";

const RECONNECT_MS = 3000;
const SIZE = 360;

function peerLayers(peer) {
  return (peer.records || []).map((record) => `${record.model_id} ${layerRange(record.layers)}`);
}

function map(snapshot) {
  const center = SIZE / 2;
  const radius = SIZE / 2 - 60;
  const peers = snapshot.peers;
  const drawing = svg("svg", {
    viewBox: `0 0 ${SIZE} ${SIZE}`,
    class: "map",
    role: "img",
    "aria-label": t("network.map_label", { count: peers.length }),
  });
  const angles = peers.map((peer, index) => (2 * Math.PI * index) / Math.max(peers.length, 1) - Math.PI / 2);
  const positions = angles.map((angle) => [center + radius * Math.cos(angle), center + radius * Math.sin(angle)]);
  peers.forEach((peer, index) => {
    const [x, y] = positions[index];
    drawing.append(svg("line", { x1: center, y1: center, x2: x, y2: y, class: "link" }));
    if (peer.latency_ms !== null && peer.latency_ms !== undefined) {
      // Beside the link's middle, not on it.
      const angle = angles[index];
      const lx = (center + x) / 2 - Math.sin(angle) * 10;
      const ly = (center + y) / 2 + Math.cos(angle) * 10 + 4;
      const anchor = Math.sin(angle) > 0.3 ? "end" : Math.sin(angle) < -0.3 ? "start" : "middle";
      drawing.append(svg("text", { x: lx, y: ly, class: "latency", "text-anchor": anchor }, t("common.ms", { ms: formatNumber(peer.latency_ms, 1) })));
    }
  });
  const me = snapshot.self;
  drawing.append(
    svg("circle", { cx: center, cy: center, r: 22, class: "node self" }),
    svg("text", { x: center, y: center + 4, "text-anchor": "middle", class: "label strong" }, t("network.you")),
    svg("text", { x: center, y: center + 38, "text-anchor": "middle", class: "label" }, layerRange(me.layers)),
  );
  peers.forEach((peer, index) => {
    const [x, y] = positions[index];
    const angle = angles[index];
    // The labels sit on the far side of the peer from the centre.
    const cos = Math.cos(angle);
    const sin = Math.sin(angle);
    const anchor = cos > 0.3 ? "start" : cos < -0.3 ? "end" : "middle";
    const lx = x + cos * 22;
    const top = sin < -0.3 ? y - 36 : sin > 0.3 ? y + 30 : y - 4;
    const layers = peerLayers(peer);
    drawing.append(
      svg("circle", { cx: x, cy: y, r: 16, class: `node peer ${peer.verified ? "verified" : ""}` }, svg("title", {}, peer.peer_id)),
      svg("text", { x: lx, y: top, "text-anchor": anchor, class: "label strong-peer" }, shortId(peer.peer_id)),
      svg("text", { x: lx, y: top + 14, "text-anchor": anchor, class: "label" }, layers.length ? layers.join(", ") : t("network.no_layers")),
    );
  });
  return drawing;
}

function peerTable(snapshot) {
  if (!snapshot.peers.length) return h("p", { class: "hint", "data-field": "no-peers" }, t("network.alone"));
  return table(
    { class: "peers" },
    ["peer", "address", "layers", "latency", "source", "seen"].map((column) => t(`network.column.${column}`)),
    snapshot.peers.map((peer) =>
      h(
        "tr",
        { "data-peer": peer.peer_id },
        h("td", {}, h("code", { title: peer.peer_id }, shortId(peer.peer_id)), peer.verified ? h("span", { class: "badge ready small" }, t("network.verified")) : null),
        h("td", {}, peer.dht || "–"),
        h("td", {}, peerLayers(peer).join(", ") || t("network.no_layers")),
        h("td", {}, peer.latency_ms === null || peer.latency_ms === undefined ? "–" : t("common.ms", { ms: formatNumber(peer.latency_ms, 1) })),
        h("td", {}, peer.source || "–"),
        h("td", {}, peer.last_seen ? t("network.ago", { time: formatSeconds(snapshot.time - peer.last_seen) }) : "–"),
      ),
    ),
    t("network.peers"),
  );
}

function summary(snapshot) {
  const me = snapshot.self;
  const dht = snapshot.dht || {};
  return h(
    "dl",
    { class: "facts" },
    h("dt", {}, t("network.peer_id")),
    h("dd", { "data-field": "peer-id" }, h("code", {}, me.peer_id || "–")),
    h("dt", {}, t("network.network_id")),
    h("dd", {}, me.network_id || "–"),
    h("dt", {}, t("network.model")),
    h("dd", {}, me.model_id ? `${me.model_id} ${layerRange(me.layers)}` : "–"),
    h("dt", {}, t("network.stage")),
    h("dd", {}, me.stage_address || "–"),
    h("dt", {}, t("network.dht")),
    h("dd", {}, dht.state === "down" ? t("network.dht_down", { error: dht.error }) : me.dht || "–"),
    h("dt", {}, t("network.throughput")),
    h("dd", {}, me.throughput_layers_s ? t("network.layers_per_s", { rate: formatNumber(me.throughput_layers_s, 1) }) : "–"),
  );
}

export function render(view) {
  const state = { controller: null, timer: null, stopped: false, last: 0, tick: null };
  const live = h("p", { class: "live", role: "status" }, t("network.connecting"));
  const content = h("div", { class: "network" });
  view.append(h("h1", {}, t("network.title")), h("p", { class: "lead" }, t("network.lead")), live, content);

  function show(snapshot) {
    state.last = Date.now();
    live.textContent = t("network.live", { count: snapshot.peers.length });
    live.className = "live on";
    content.replaceChildren(
      h("section", { class: "card map-card" }, h("h2", {}, t("network.map")), map(snapshot)),
      h("section", { class: "card" }, h("h2", {}, t("network.this_node")), summary(snapshot)),
      h("section", { class: "card wide" }, h("h2", {}, t("network.peers")), peerTable(snapshot)),
    );
  }

  async function connect() {
    state.controller = new AbortController();
    try {
      for await (const { event, data } of events("/api/dashboard/network/stream", { signal: state.controller.signal })) {
        if (event === "network") show(data);
      }
    } catch (error) {
      if (state.stopped || error.name === "AbortError") return;
      live.textContent = t("network.lost", { message: error.message });
      live.className = "live off";
      if (!content.children.length) content.append(notice(error.message));
    }
    if (!state.stopped) state.timer = setTimeout(connect, RECONNECT_MS);
  }

  connect();
  return () => {
    state.stopped = true;
    clearTimeout(state.timer);
    if (state.controller) state.controller.abort();
  };
}
