// The dashboard's entry point: the page shell (navigation, node state, theme, API key)
// and the hash router that mounts one page at a time. Each page module exports
// `render(view)` and may return a function that stops its timers and streams.
import { ensureKey, setKey, hasKey } from "./api.js";
import { formatNumber } from "./dom.js";
import { t, translate } from "./i18n.js";
import * as chat from "./page-chat.js";
import * as compare from "./page-compare.js";
import * as credits from "./page-credits.js";
import * as models from "./page-models.js";
import * as network from "./page-network.js";
import * as pool from "./page-pool.js";
import * as settings from "./page-settings.js";
import * as setup from "./page-setup.js";
import { SETUP_DONE } from "./page-setup.js";

const PAGES = { chat, compare, credits, models, network, pool, settings, setup };
const THEMES = ["system", "light", "dark"];
const STATE_POLL_MS = 5000;

const $ = (id) => document.getElementById(id);
let leave = null;

// -- theme -------------------------------------------------------------------------

function applyTheme(theme) {
  if (theme === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  const button = $("theme");
  button.textContent = t(`theme.${theme}`);
  button.setAttribute("aria-label", t("theme.label", { theme: t(`theme.${theme}`) }));
}

function cycleTheme() {
  const current = localStorage.getItem("swarm-theme") || "system";
  const next = THEMES[(THEMES.indexOf(current) + 1) % THEMES.length];
  localStorage.setItem("swarm-theme", next);
  applyTheme(next);
}

// -- node state badge ------------------------------------------------------------------

async function refreshState() {
  const badge = $("node-state");
  let label = "down";
  let load = null;
  try {
    const reply = await fetch("/health/state");
    const body = await reply.json();
    label = body.status === "ready" ? "ready" : body.subsystems && body.subsystems.node ? (body.node && body.node.state) || "loading" : "down";
    load = label === "loading" && body.node ? body.node.load : null;
  } catch (error) {
    label = "down";
  }
  badge.textContent = load ? t("state.loading_percent", { percent: formatNumber(load.percent) }) : t(`state.${label}`);
  badge.className = `badge ${label}`;
}

// -- router ---------------------------------------------------------------------------

function route() {
  const hash = location.hash;
  if (hash && !hash.startsWith("#/")) return; // an in-page anchor, not a page
  let name = hash.slice(2).split("/")[0];
  if (!PAGES[name]) {
    name = localStorage.getItem(SETUP_DONE) ? "chat" : "setup";
    history.replaceState(null, "", `#/${name}`);
  }
  if (typeof leave === "function") leave();
  const view = $("view");
  view.replaceChildren();
  view.dataset.page = name;
  for (const link of document.querySelectorAll("nav a[data-route]")) {
    if (link.dataset.route === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${t(`nav.${name}`)} · swarm`;
  leave = PAGES[name].render(view);
  view.focus({ preventScroll: true });
}

async function askForKey() {
  const known = await ensureKey();
  $("key-banner").hidden = known;
  return known;
}

document.addEventListener("DOMContentLoaded", async () => {
  translate(document);
  applyTheme(localStorage.getItem("swarm-theme") || "system");
  $("theme").addEventListener("click", cycleTheme);
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    $("view").focus();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("key-input").value);
    $("key-banner").hidden = hasKey();
    route();
  });
  refreshState();
  setInterval(refreshState, STATE_POLL_MS);
  await askForKey();
  window.addEventListener("hashchange", route);
  route();
});
