// Compare: one prompt sent to two models (or one model at two temperatures) at once, the
// replies streamed side by side with their token counts and speeds from the API's usage.
import { modelLabel, servedModels, streamChat } from "./api.js";
import { clear, formatNumber, h, notice } from "./dom.js";
import { t } from "./i18n.js";
import { render as markdown } from "./markdown.js";

const MAX_TOKENS = 512;

export function render(view) {
  const state = { controller: null, stopped: false };
  const prompt = h("textarea", { id: "compare-prompt", rows: 3, placeholder: t("compare.placeholder") });
  const run = h("button", { type: "submit", class: "primary" }, t("compare.run"));
  const stop = h("button", { type: "button", class: "danger", hidden: true }, t("chat.stop"));
  const errors = h("div");
  const sides = [0, 1].map((index) => {
    const picker = h("select", { id: `compare-model-${index}` });
    const temperature = h("input", { id: `compare-temperature-${index}`, type: "number", min: 0, max: 2, step: 0.1, value: index ? "1" : "0" });
    const output = h("div", { class: "transcript compare-output", "aria-live": "polite" });
    const stats = h("p", { class: "hint" });
    const column = h(
      "section",
      { class: "card", "aria-label": t("compare.side", { side: index + 1 }) },
      h("h2", {}, t("compare.side", { side: index + 1 })),
      h(
        "div",
        { class: "toolbar" },
        h("label", { for: `compare-model-${index}` }, t("chat.model")),
        picker,
        h("label", { for: `compare-temperature-${index}` }, t("compare.temperature")),
        temperature,
      ),
      output,
      stats,
    );
    return { picker, temperature, output, stats, column };
  });
  const form = h(
    "form",
    { class: "card composer" },
    h("label", { for: "compare-prompt" }, t("compare.prompt")),
    prompt,
    h("div", { class: "composer-actions" }, run, stop),
  );
  view.append(h("h1", {}, t("compare.title")), h("p", { class: "lead" }, t("compare.lead")), form, errors, h("div", { class: "compare" }, ...sides.map((side) => side.column)));

  async function runSide(side, text, signal) {
    clear(side.output);
    side.stats.textContent = t("chat.waiting");
    const started = performance.now();
    let frame = 0;
    let latest = "";
    try {
      const result = await streamChat({
        model: side.picker.value,
        messages: [{ role: "user", content: text }],
        maxTokens: MAX_TOKENS,
        temperature: Number(side.temperature.value),
        signal,
        onText: (delta, all) => {
          latest = all;
          if (!frame) {
            frame = requestAnimationFrame(() => {
              frame = 0;
              side.output.replaceChildren(markdown(latest));
            });
          }
        },
      });
      cancelAnimationFrame(frame);
      side.output.replaceChildren(markdown(result.text));
      const seconds = (performance.now() - started) / 1000;
      const tokens = result.usage ? result.usage.completion_tokens : 0;
      side.stats.textContent = t("compare.stats", { tokens: formatNumber(tokens), seconds: formatNumber(seconds, 1), rate: formatNumber(tokens / Math.max(seconds, 1e-3), 1) });
    } catch (error) {
      cancelAnimationFrame(frame);
      side.output.replaceChildren(markdown(latest));
      side.stats.textContent = error.name === "AbortError" ? t("chat.stopped_stats") : "";
      if (error.name !== "AbortError") side.output.append(notice(t("chat.error", { message: error.message })));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || state.controller) return;
    state.controller = new AbortController();
    run.disabled = true;
    stop.hidden = false;
    await Promise.all(sides.map((side) => runSide(side, text, state.controller.signal)));
    state.controller = null;
    if (!state.stopped) {
      run.disabled = false;
      stop.hidden = true;
    }
  });
  stop.addEventListener("click", () => state.controller && state.controller.abort());

  servedModels()
    .then((models) => {
      for (const side of sides) {
        side.picker.replaceChildren(...models.map((model) => h("option", { value: model.id }, modelLabel(model, t))));
        if (models.length > 1 && side === sides[1]) side.picker.selectedIndex = 1;
      }
      run.disabled = !models.length;
      if (models.length === 1) errors.append(notice(t("compare.one_model", { model: models[0].id }), "info"));
    })
    .catch((error) => errors.append(notice(t("chat.no_models", { message: error.message }))));

  return () => {
    state.stopped = true;
    if (state.controller) state.controller.abort();
  };
}
