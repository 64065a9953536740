// The first-run wizard: this machine's hardware, a model (downloaded if need be), the
// node loading it, then chat. Every figure comes from /api/dashboard/hardware,
// /api/dashboard/models and /health/state.
import { api, ApiError } from "./api.js";
import { clear, formatBytes, formatNumber, formatSeconds, h, notice, pullProgress } from "./dom.js";
import { t } from "./i18n.js";

export const SETUP_DONE = "swarm-setup-done";
const POLL_MS = 1000;
const STEPS = ["hardware", "model", "loading", "ready"];

export function render(view) {
  const state = { step: 0, hardware: null, models: [], chosen: null, timer: null, stopped: false, began: Date.now() };
  const progress = h("ol", { class: "steps", "aria-label": t("setup.steps") });
  const body = h("section", { class: "card wizard", "aria-live": "polite" });
  view.append(h("h1", {}, t("setup.title")), h("p", { class: "lead" }, t("setup.lead")), progress, body);

  function stopTimer() {
    clearTimeout(state.timer);
    state.timer = null;
  }

  function show(step) {
    stopTimer();
    state.step = step;
    clear(progress);
    STEPS.forEach((name, index) => {
      progress.append(
        h(
          "li",
          { class: index === step ? "current" : index < step ? "done" : "", "aria-current": index === step ? "step" : null },
          t(`setup.step.${name}`),
        ),
      );
    });
    clear(body);
    ({ 0: hardwareStep, 1: modelStep, 2: loadingStep, 3: readyStep })[step]();
    const heading = body.querySelector("h2");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      if (state.stepped) heading.focus();
    }
    state.stepped = true;
  }

  function nav(...buttons) {
    return h("div", { class: "actions" }, ...buttons);
  }

  async function hardwareStep() {
    body.append(h("h2", {}, t("setup.hardware.title")), h("p", { class: "hint" }, t("common.loading")));
    try {
      state.hardware = state.hardware || (await api("/api/dashboard/hardware"));
    } catch (error) {
      clear(body).append(h("h2", {}, t("setup.hardware.title")), notice(error.message));
      return;
    }
    if (state.step !== 0 || state.stopped) return;
    const hw = state.hardware;
    const gpus = hw.gpus.length
      ? hw.gpus.map((gpu) => h("dd", { "data-field": "gpu" }, t("setup.hardware.gpu", { name: gpu.name, memory: formatBytes(gpu.memory_bytes) })))
      : [h("dd", { "data-field": "gpu" }, t("setup.hardware.no_gpu"))];
    clear(body).append(
      h("h2", {}, t("setup.hardware.title")),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, t("setup.hardware.cpu")),
        h("dd", { "data-field": "cpu" }, hw.cpu.model || t("common.unknown")),
        h("dt", {}, t("setup.hardware.threads")),
        h("dd", { "data-field": "threads" }, t("setup.hardware.cores", { cores: hw.cpu.cores, threads: hw.cpu.threads })),
        h("dt", {}, t("setup.hardware.memory")),
        h("dd", { "data-field": "memory" }, t("setup.hardware.memory_value", { total: formatBytes(hw.memory.total_bytes), available: formatBytes(hw.memory.available_bytes) })),
        h("dt", {}, t("setup.hardware.gpus")),
        ...gpus,
        h("dt", {}, t("setup.hardware.disk")),
        h("dd", { "data-field": "disk" }, t("setup.hardware.disk_value", { free: formatBytes(hw.disk.free_bytes), path: hw.disk.path })),
      ),
      nav(h("button", { type: "button", class: "primary", onclick: () => show(1) }, t("common.next"))),
    );
  }

  function modelOption(model, available) {
    const fits = model.size_bytes === null || model.size_bytes < available;
    const facts = [];
    if (model.served) facts.push(t(`setup.model.served.${model.state || "unknown"}`));
    else if (model.installed) facts.push(t("setup.model.installed"));
    else facts.push(t("setup.model.not_installed"));
    if (model.size_bytes !== null) facts.push(formatBytes(model.size_bytes));
    if (!fits) facts.push(t("setup.model.too_big"));
    const input = h("input", { type: "radio", name: "model", value: model.id, id: `model-${model.id}`, checked: state.chosen === model.id });
    input.addEventListener("change", () => {
      state.chosen = model.id;
      renderModelActions();
    });
    return h(
      "li",
      { class: "choice" },
      input,
      h("label", { for: `model-${model.id}` }, h("strong", {}, model.id), " ", h("span", { class: "hint" }, model.description), h("span", { class: "facts-line" }, facts.join(" · "))),
    );
  }

  const actions = h("div", { class: "actions" });
  const status = h("div", { class: "status-area", "aria-live": "polite" });

  function chosenModel() {
    return state.models.find((model) => model.id === state.chosen);
  }

  function renderModelActions() {
    clear(actions);
    clear(status);
    const model = chosenModel();
    actions.append(h("button", { type: "button", class: "ghost", onclick: () => show(0) }, t("common.back")));
    if (!model) return;
    if (model.served) {
      actions.append(h("button", { type: "button", class: "primary", onclick: () => show(2) }, t("setup.model.use")));
    } else if (!model.installed && model.registered) {
      actions.append(h("button", { type: "button", class: "primary", onclick: () => pull(model) }, t("setup.model.download")));
    } else if (model.installed) {
      actions.append(h("button", { type: "button", class: "primary", onclick: () => serve(model) }, t("setup.model.serve")));
    }
    if (model.pull && model.pull.state === "running") watchPull(model.id);
  }

  async function pull(model) {
    try {
      await api(`/api/dashboard/models/${encodeURIComponent(model.id)}/pull`, { method: "POST" });
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 409)) {
        clear(status).append(notice(error.message));
        return;
      }
    }
    watchPull(model.id);
  }

  async function watchPull(id) {
    stopTimer();
    let current;
    try {
      current = await api(`/api/dashboard/models/${encodeURIComponent(id)}/pull`);
    } catch (error) {
      clear(status).append(notice(error.message));
      return;
    }
    if (state.stopped || state.step !== 1) return;
    clear(status).append(
      h("p", { class: "hint" }, t(`setup.pull.${current.state}`, { model: id })),
      pullProgress(current, t("setup.pull.running", { model: id })),
      h("pre", { class: "log" }, current.message || ""),
    );
    if (current.state === "running") state.timer = setTimeout(() => watchPull(id), POLL_MS);
    else if (current.state === "done") loadModels();
  }

  async function serve(model) {
    try {
      await api("/api/dashboard/serve", { method: "PUT", body: { model: model.id } });
    } catch (error) {
      clear(status).append(notice(error.message));
      return;
    }
    state.switchingTo = model.id;
    state.began = Date.now();
    show(2);
  }

  async function loadModels() {
    let answer;
    try {
      answer = await api("/api/dashboard/models");
    } catch (error) {
      clear(status).append(notice(error.message));
      return;
    }
    if (state.stopped || state.step !== 1) return;
    state.models = answer.models.filter((model) => model.registered || model.served || model.installed);
    if (!state.chosen) state.chosen = (state.models.find((model) => model.served) || state.models[0] || {}).id;
    const available = state.hardware ? state.hardware.memory.available_bytes : Infinity;
    const list = h("ul", { class: "choices", role: "radiogroup", "aria-label": t("setup.model.title") }, ...state.models.map((model) => modelOption(model, available)));
    const old = body.querySelector(".choices");
    if (old) old.replaceWith(list);
    else body.insertBefore(list, actions);
    renderModelActions();
  }

  function modelStep() {
    body.append(h("h2", {}, t("setup.model.title")), h("p", { class: "hint" }, t("setup.model.lead")), actions, status);
    loadModels();
  }

  async function loadingStep() {
    if (!body.querySelector("h2")) {
      body.append(
        h("h2", {}, t("setup.loading.title")),
        h("p", { class: "hint", "data-field": "loading" }, t("common.loading")),
        h("progress", { "aria-label": t("setup.loading.title") }),
        nav(h("button", { type: "button", class: "ghost", onclick: () => show(1) }, t("common.back"))),
      );
    }
    const line = body.querySelector("[data-field=loading]");
    let ready = false;
    try {
      const reply = await fetch("/health/state");
      const answer = await reply.json();
      const node = answer.node || {};
      // After a switch the old model answers until the node restarts: wait for the new one.
      ready = answer.status === "ready" && (!state.switchingTo || node.model === state.switchingTo);
      const elapsed = formatSeconds((Date.now() - state.began) / 1000);
      const switching = state.switchingTo && node.model !== state.switchingTo;
      const bar = body.querySelector("progress");
      const load = !switching && node.state === "loading" ? node.load : null;
      if (bar && load) {
        bar.max = 100;
        bar.value = load.percent;
      } else if (bar) {
        bar.removeAttribute("value"); // indeterminate until the node reports how far it is
      }
      line.textContent = switching
        ? t("setup.loading.switching", { model: state.switchingTo, elapsed })
        : load
          ? t(`setup.loading.phase.${load.phase}`, {
              percent: formatNumber(load.percent),
              done: formatNumber(load.done / 1e6),
              total: formatNumber((load.total || 0) / 1e6),
              elapsed: formatSeconds(load.elapsed_s),
            })
          : answer.subsystems.node
            ? t(`setup.loading.${node.state}`, { elapsed })
            : t("setup.loading.down", { elapsed });
      if (node.state === "failed") {
        body.querySelector("progress")?.remove();
        return;
      }
    } catch (error) {
      line.textContent = t("setup.loading.down", { elapsed: formatSeconds((Date.now() - state.began) / 1000) });
    }
    if (state.stopped || state.step !== 2) return;
    if (ready) show(3);
    else state.timer = setTimeout(loadingStep, POLL_MS);
  }

  async function readyStep() {
    body.append(h("h2", {}, t("setup.ready.title")));
    const served = state.switchingTo
      ? state.models.find((model) => model.id === state.switchingTo) || { id: state.switchingTo }
      : state.models.find((model) => model.served) || {};
    body.append(
      h("p", {}, t("setup.ready.lead", { model: served.id || "–" })),
      served.context_length ? h("p", { class: "hint" }, t("setup.ready.context", { tokens: formatNumber(served.context_length) })) : null,
      nav(
        h("button", { type: "button", class: "ghost", onclick: () => show(1) }, t("common.back")),
        h(
          "button",
          {
            type: "button",
            class: "primary",
            onclick: () => {
              localStorage.setItem(SETUP_DONE, "1");
              location.hash = "#/chat";
            },
          },
          t("setup.ready.start"),
        ),
      ),
    );
  }

  show(0);
  return () => {
    state.stopped = true;
    stopTimer();
  };
}
