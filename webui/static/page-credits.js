// Credits and tier: what /api/dashboard/credits says. Until credits are active (issue 8)
// it says so, and shows no balance: nothing here is made up.
import { api } from "./api.js";
import { formatNumber, h, notice } from "./dom.js";
import { t } from "./i18n.js";

export function render(view) {
  let stopped = false;
  const body = h("section", { class: "card" }, h("p", { class: "hint" }, t("common.loading")));
  view.append(h("h1", {}, t("credits.title")), body);
  api("/api/dashboard/credits")
    .then((answer) => {
      if (stopped) return;
      const tiers = h(
        "ul",
        { class: "tiers" },
        ...answer.tiers.map((tier) =>
          h("li", { class: `tier ${tier.id}` }, h("strong", {}, t(`credits.tier.${tier.id}`)), " ", t(`credits.rule.${tier.rule}`, { percent: tier.percent })),
        ),
      );
      body.replaceChildren(
        h("h2", {}, t("credits.status")),
        answer.active
          ? h("p", { class: "balance" }, t("credits.balance", { balance: formatNumber(answer.balance) }), " · ", t(`credits.tier.${answer.tier}`))
          : h("p", { class: "badge inactive", "data-field": "credits-status" }, t("credits.not_active")),
        h("p", {}, answer.active ? "" : t("credits.explain")),
        h("h2", {}, t("credits.tiers")),
        tiers,
      );
    })
    .catch((error) => {
      if (!stopped) body.replaceChildren(notice(error.message));
    });
  return () => {
    stopped = true;
  };
}
