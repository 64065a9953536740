// Translation: every string the pages show comes from one catalog per language
// (strings-en.js first). t("chat.send") looks a key up; {name} placeholders are filled
// from the second argument. A key missing from the catalog shows as itself.
import en from "./strings-en.js";

const catalogs = { en };
let current = "en";

export function locale() {
  return current;
}

export function t(key, params) {
  const text = (catalogs[current] && catalogs[current][key]) ?? en[key] ?? key;
  if (!params) return text;
  return text.replace(/\{(\w+)\}/g, (match, name) => (name in params ? String(params[name]) : match));
}

// Fills elements of the static page shell: data-i18n (text), data-i18n-label (aria-label),
// data-i18n-title (title).
export function translate(root) {
  for (const element of root.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  for (const element of root.querySelectorAll("[data-i18n-label]")) {
    element.setAttribute("aria-label", t(element.dataset.i18nLabel));
  }
  for (const element of root.querySelectorAll("[data-i18n-title]")) {
    element.setAttribute("title", t(element.dataset.i18nTitle));
  }
}
