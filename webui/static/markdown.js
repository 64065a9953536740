// A small, safe Markdown renderer for model replies: it builds DOM nodes and sets only
// text, so a reply can never inject markup. Handles what chat models write: fenced code
// blocks (```lang), inline code, **bold**, *italic* / _italic_, headings, bullet and
// numbered lists, block quotes, horizontal rules and [links](https://…) (http, https and
// mailto only; opened with rel="noopener noreferrer"). Unclosed constructs (a reply still
// streaming) render as far as they go.
import { h } from "./dom.js";

const SAFE_URL = /^(https?:\/\/|mailto:)/i;
// Inline tokens, tried left to right: code, link, bold, italic.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*([^*\n]+)\*\*|__([^_\n]+)__|\*([^*\n]+)\*|\b_([^_\n]+)_\b/;

export function inline(text) {
  const nodes = [];
  let rest = text;
  while (rest) {
    const match = INLINE.exec(rest);
    if (!match) {
      nodes.push(document.createTextNode(rest));
      break;
    }
    if (match.index) nodes.push(document.createTextNode(rest.slice(0, match.index)));
    if (match[1]) {
      nodes.push(h("code", {}, match[2]));
    } else if (match[3] !== undefined) {
      const url = match[4];
      nodes.push(
        SAFE_URL.test(url)
          ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, ...inline(match[3]))
          : document.createTextNode(match[0]),
      );
    } else if (match[5] !== undefined || match[6] !== undefined) {
      nodes.push(h("strong", {}, ...inline(match[5] ?? match[6])));
    } else {
      nodes.push(h("em", {}, ...inline(match[7] ?? match[8])));
    }
    rest = rest.slice(match.index + match[0].length);
  }
  return nodes;
}

function paragraph(lines) {
  const nodes = [];
  lines.forEach((line, index) => {
    if (index) nodes.push(h("br"));
    nodes.push(...inline(line));
  });
  return h("p", {}, ...nodes);
}

const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d+)[.)]\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

// The Markdown `source` as a DocumentFragment.
export function render(source) {
  const fragment = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let index = 0;
  while (index < lines.length) {
    const line = lines[index];
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      index += 1;
      while (index < lines.length && !lines[index].trim().startsWith(fence[1])) body.push(lines[index++]);
      index += 1;
      const code = h("code", fence[2] ? { "data-lang": fence[2] } : {}, body.join("\n"));
      fragment.append(h("pre", { tabindex: 0 }, code));
      continue;
    }
    if (!line.trim()) {
      index += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      // Model headings sit below the page's own: h3 and smaller.
      const level = Math.min(6, heading[1].length + 2);
      fragment.append(h(`h${level}`, {}, ...inline(heading[2])));
      index += 1;
      continue;
    }
    if (RULE.test(line)) {
      fragment.append(h("hr"));
      index += 1;
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      const numbered = !BULLET.test(line);
      const pattern = numbered ? NUMBERED : BULLET;
      const start = numbered ? Number(NUMBERED.exec(line)[1]) : 1;
      const list = h(numbered ? "ol" : "ul", numbered && start !== 1 ? { start } : {});
      while (index < lines.length && pattern.test(lines[index])) {
        const match = pattern.exec(lines[index]);
        list.append(h("li", {}, ...inline(numbered ? match[2] : match[1])));
        index += 1;
      }
      fragment.append(list);
      continue;
    }
    if (line.startsWith(">")) {
      const quoted = [];
      while (index < lines.length && lines[index].startsWith(">")) quoted.push(lines[index++].replace(/^>\s?/, ""));
      fragment.append(h("blockquote", {}, render(quoted.join("\n"))));
      continue;
    }
    const text = [];
    while (
      index < lines.length &&
      lines[index].trim() &&
      !FENCE.test(lines[index]) &&
      !HEADING.test(lines[index]) &&
      !BULLET.test(lines[index]) &&
      !NUMBERED.test(lines[index]) &&
      !lines[index].startsWith(">")
    ) {
      text.push(lines[index++]);
    }
    fragment.append(paragraph(text));
  }
  return fragment;
}
