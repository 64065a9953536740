// Settings: every config key from /api/admin/config, as a form checked against each key's
// type and limits before it is sent; the node checks again and its message is shown when
// it refuses. The API key is shown only when /api/admin/api-key answers (this machine).
import { api, loopbackKey } from "./api.js";
import { clear, h, notice } from "./dom.js";
import { t } from "./i18n.js";

const SECRET_KEYS = new Set(["api.key"]);

// The value typed into a field of key `spec`, or { error } saying what is wrong with it.
export function parseField(spec, raw) {
  if (spec.type === "bool") return { value: Boolean(raw) };
  if (spec.type === "list[str]") {
    return { value: String(raw).split(",").map((item) => item.trim()).filter(Boolean) };
  }
  if (spec.choices) {
    return spec.choices.includes(raw) ? { value: raw } : { error: t("settings.error.choices", { choices: spec.choices.join(", ") }) };
  }
  if (spec.type === "int" || spec.type === "float") {
    const text = String(raw).trim();
    const value = Number(text);
    if (!text || !Number.isFinite(value)) return { error: t("settings.error.number") };
    if (spec.type === "int" && !Number.isInteger(value)) return { error: t("settings.error.integer") };
    if (spec.high !== undefined && (value < spec.low || value > spec.high)) {
      return { error: t("settings.error.between", { low: spec.low, high: spec.high }) };
    }
    if (spec.low !== undefined && value < spec.low) return { error: t("settings.error.low", { low: spec.low }) };
    if (spec.above !== undefined && value <= spec.above) return { error: t("settings.error.above", { above: spec.above }) };
    return { value };
  }
  return { value: String(raw) };
}

function fieldId(key) {
  return `setting-${key.replace(/[^\w-]/g, "-")}`;
}

function input(spec, value) {
  const id = fieldId(spec.key);
  const common = { id, name: spec.key, "aria-describedby": `${id}-doc ${id}-error` };
  if (spec.type === "bool") return h("input", { ...common, type: "checkbox", checked: Boolean(value) });
  if (spec.choices) {
    const select = h("select", common, ...spec.choices.map((choice) => h("option", { value: choice }, choice)));
    select.value = value;
    return select;
  }
  if (spec.type === "int" || spec.type === "float") {
    // No min/max attributes: the browser would refuse the value silently; parseField says why.
    return h("input", { ...common, type: "text", inputmode: spec.type === "int" ? "numeric" : "decimal", value: String(value), autocomplete: "off" });
  }
  if (spec.type === "list[str]") return h("input", { ...common, type: "text", value: value.join(", "), autocomplete: "off" });
  return h("input", { ...common, type: SECRET_KEYS.has(spec.key) ? "password" : "text", value: String(value), autocomplete: "off", spellcheck: "false" });
}

function readField(element) {
  return element.type === "checkbox" ? element.checked : element.value;
}

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function keyPanel() {
  const panel = h("section", { class: "card", "aria-labelledby": "api-key-heading" }, h("h2", { id: "api-key-heading" }, t("settings.key.title")));
  loopbackKey().then((key) => {
    if (!key) {
      panel.append(h("p", { class: "hint", "data-field": "api-key" }, t("settings.key.loopback_only")));
      return;
    }
    const field = h("input", { id: "api-key", type: "password", value: key, readonly: true, class: "mono", "aria-describedby": "api-key-hint" });
    const toggle = h("button", { type: "button", class: "ghost", "aria-pressed": "false" }, t("settings.key.show"));
    toggle.addEventListener("click", () => {
      const shown = field.type === "text";
      field.type = shown ? "password" : "text";
      toggle.textContent = t(shown ? "settings.key.show" : "settings.key.hide");
      toggle.setAttribute("aria-pressed", shown ? "false" : "true");
    });
    const copied = h("span", { class: "hint", role: "status" });
    const copy = h("button", { type: "button", class: "ghost" }, t("settings.key.copy"));
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(key);
        copied.textContent = t("settings.key.copied");
      } catch (error) {
        field.type = "text";
        field.select();
        copied.textContent = t("settings.key.copy_by_hand");
      }
    });
    panel.append(
      h("label", { for: "api-key" }, t("settings.key.label")),
      h("div", { class: "row" }, field, toggle, copy),
      copied,
      h("p", { class: "hint", id: "api-key-hint" }, t("settings.key.hint", { origin: location.origin })),
    );
  });
  return panel;
}

export function render(view) {
  let stopped = false;
  const form = h("form", { class: "settings", novalidate: true });
  const result = h("div", { class: "result", "aria-live": "polite" });
  view.append(h("h1", {}, t("settings.title")), h("p", { class: "lead" }, t("settings.lead")), keyPanel(), form);

  async function load() {
    let answer;
    try {
      answer = await api("/api/admin/config");
    } catch (error) {
      if (!stopped) form.replaceChildren(notice(error.message));
      return;
    }
    if (stopped) return;
    const specs = new Map(answer.keys.map((spec) => [spec.key, spec]));
    const sections = new Map();
    for (const spec of answer.keys) {
      const [section, name] = spec.key.split(".");
      if (!sections.has(section)) sections.set(section, []);
      sections.get(section).push({ spec, name, value: answer.config[section][name] });
    }
    const fieldsets = [];
    for (const [section, items] of sections) {
      fieldsets.push(
        h(
          "fieldset",
          { class: "card" },
          h("legend", {}, section),
          ...items.map(({ spec, name, value }) => {
            const id = fieldId(spec.key);
            const control = input(spec, value);
            const label = h("label", { for: id }, h("code", {}, name), spec.restart ? h("span", { class: "badge small" }, t("settings.restart")) : null);
            return h(
              "div",
              { class: `field ${spec.type === "bool" ? "check" : ""}`, "data-key": spec.key },
              spec.type === "bool" ? h("div", { class: "row" }, control, label) : label,
              spec.type === "bool" ? null : control,
              h("p", { class: "hint", id: `${id}-doc` }, spec.doc),
              h("p", { class: "field-error", id: `${id}-error`, hidden: true }),
            );
          }),
        ),
      );
    }
    const save = h("button", { type: "submit", class: "primary" }, t("settings.save"));
    const reset = h("button", { type: "button", class: "ghost" }, t("settings.revert"));
    reset.addEventListener("click", () => {
      clear(result);
      load();
    });
    form.replaceChildren(...fieldsets, h("div", { class: "actions sticky" }, save, reset, result));
    if (answer.restart_needed.length) result.append(notice(t("settings.restart_needed", { keys: answer.restart_needed.join(", ") }), "info"));

    form.onsubmit = async (event) => {
      event.preventDefault();
      clear(result);
      const updates = {};
      const invalid = [];
      for (const element of form.querySelectorAll("[name]")) {
        const spec = specs.get(element.name);
        const [section, name] = spec.key.split(".");
        const error = form.querySelector(`#${fieldId(spec.key)}-error`);
        const parsed = parseField(spec, readField(element));
        if (parsed.error) {
          invalid.push(element);
          element.setAttribute("aria-invalid", "true");
          error.textContent = parsed.error;
          error.hidden = false;
          continue;
        }
        element.removeAttribute("aria-invalid");
        error.hidden = true;
        if (!same(parsed.value, answer.config[section][name])) {
          updates[section] = { ...(updates[section] || {}), [name]: parsed.value };
        }
      }
      if (invalid.length) {
        result.append(notice(t("settings.invalid", { count: invalid.length })));
        invalid[0].focus();
        return;
      }
      if (!Object.keys(updates).length) {
        result.append(notice(t("settings.unchanged"), "info"));
        return;
      }
      save.disabled = true;
      try {
        const saved = await api("/api/admin/config", { method: "PUT", body: updates });
        answer.config = saved.config;
        result.append(
          notice(
            saved.restart_needed.length ? t("settings.saved_restart", { keys: saved.restart_needed.join(", ") }) : t("settings.saved"),
            "info",
          ),
        );
      } catch (error) {
        result.append(notice(t("settings.refused", { message: error.message })));
      } finally {
        save.disabled = false;
      }
    };
  }

  form.append(h("p", { class: "hint" }, t("common.loading")));
  load();
  return () => {
    stopped = true;
  };
}
