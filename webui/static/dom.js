// DOM helpers: elements are built node by node, text always goes in as text (never as
// HTML), so nothing a model or a peer says can become markup. Also the number formats.
import { t, locale } from "./i18n.js";

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(element, attributes, children) {
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      element.setAttribute("class", value);
    } else if (name === "text") {
      element.textContent = value;
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

// h("button", { class: "primary", onclick }, "Send"): an HTML element.
export function h(tag, attributes, ...children) {
  return fill(document.createElement(tag), attributes, children);
}

// An SVG element (the network map).
export function svg(tag, attributes, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attributes, children);
}

// A table that scrolls sideways at phone width: a header cell per column title, then
// `rows` (ready <tr> elements); `caption` (optional) is read by screen readers only.
export function table(attributes, columns, rows, caption) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attributes,
      caption ? h("caption", { class: "visually-hidden" }, caption) : null,
      h("thead", {}, h("tr", {}, ...columns.map((column) => h("th", { scope: "col" }, column)))),
      h("tbody", {}, ...rows),
    ),
  );
}

export function clear(element) {
  element.replaceChildren();
  return element;
}

export function formatNumber(value, digits = 0) {
  return new Intl.NumberFormat(locale(), { maximumFractionDigits: digits }).format(value);
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return t("common.unknown");
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${formatNumber(value, value < 10 && unit > 0 ? 1 : 0)} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const hours = Math.floor(s / 3600);
  const minutes = Math.floor((s % 3600) / 60);
  if (hours) return t("common.hours_minutes", { hours, minutes });
  if (minutes) return t("common.minutes_seconds", { minutes, seconds: s % 60 });
  return t("common.seconds", { seconds: s });
}

// A peer id is 32 characters; the first 8 tell peers apart on screen.
export function shortId(peerId) {
  return peerId ? String(peerId).slice(0, 8) : "–";
}

export function layerRange(layers) {
  return Array.isArray(layers) && layers.length === 2 ? t("common.layer_range", { first: layers[0], last: layers[1] }) : "–";
}

// A <p role="alert"> for an error, or a status line.
export function notice(text, kind = "error") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

// A download's progress bar and its words from a pull status (/api/dashboard/models/ID/pull):
// determinate once pip has reported byte counts, indeterminate before.
export function pullProgress(pull, label) {
  if (!pull || pull.state !== "running") return null;
  const known = typeof pull.fraction === "number";
  const bar = h("progress", known ? { value: String(pull.fraction), max: "1", "aria-label": label } : { "aria-label": label });
  if (!known) return bar;
  const words = t("pull.progress", {
    percent: formatNumber(pull.fraction * 100),
    part: formatNumber(pull.part),
    parts: formatNumber(pull.parts),
    bytes: formatBytes(pull.part_bytes),
    total: formatBytes(pull.part_total),
  });
  return h("span", { class: "pull-progress", "data-field": "pull-progress" }, bar, " ", words);
}
