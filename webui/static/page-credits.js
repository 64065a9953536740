// Credits and tier: what /api/dashboard/credits says. The balance is what peers signed
// receipts for minus what this node signed; the standing weights earnings by how much
// each signer is trusted and sets the tier. The leaderboard is the peers this node has
// checked. Every number comes from the API.
import { api } from "./api.js";
import { formatNumber, h, notice, shortId, table } from "./dom.js";
import { t } from "./i18n.js";

function stat(label, value, field) {
  return h("div", { class: "stat" }, h("span", { class: "label" }, label), h("strong", { "data-field": field }, value));
}

function receiptsTable(receipts) {
  if (!receipts.length) return h("p", { class: "hint", "data-field": "credits-no-receipts" }, t("credits.no_receipts"));
  return table(
    { "data-field": "credits-receipts" },
    ["direction", "peer", "layers", "tokens", "credits", "when"].map((key) => t(`credits.col.${key}`)),
    receipts.map((receipt) => {
      const peer = receipt.direction === "earned" ? receipt.requester : receipt.stage;
      return h(
        "tr",
        {},
        h("td", {}, t(`credits.direction.${receipt.direction}`)),
        h("td", { title: peer }, shortId(peer)),
        h("td", {}, `${receipt.layers[0]}–${receipt.layers[1]}`),
        h("td", {}, formatNumber(receipt.tokens)),
        h("td", {}, (receipt.direction === "earned" ? "+" : "−") + formatNumber(receipt.credits)),
        h("td", {}, new Date(receipt.issued * 1000).toLocaleString()),
      );
    }),
  );
}

function leaderboardTable(rows) {
  return table(
    { "data-field": "credits-leaderboard" },
    ["rank", "peer", "tier", "standing", "balance", "checked"].map((key) => t(`credits.col.${key}`)),
    rows.map((row, index) =>
      h(
        "tr",
        { class: row.self ? "self" : "" },
        h("td", {}, String(index + 1)),
        h("td", { title: row.peer_id }, row.self ? t("credits.you") : shortId(row.peer_id)),
        h("td", {}, h("span", { class: `tier ${row.tier}` }, t(`credits.tier.${row.tier}`))),
        h("td", {}, formatNumber(row.standing, 1)),
        h("td", {}, formatNumber(row.balance)),
        h("td", {}, row.self ? "" : t(row.verified ? "credits.verified" : "credits.unverified")),
      ),
    ),
  );
}

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
        h(
          "div",
          { class: "stats" },
          stat(t("credits.tier"), h("span", { class: `tier ${answer.tier}`, "data-field": "credits-status" }, t(`credits.tier.${answer.tier}`)), "credits-tier"),
          stat(t("credits.balance_label"), formatNumber(answer.balance), "credits-balance"),
          stat(t("credits.earned"), formatNumber(answer.earned), "credits-earned"),
          stat(t("credits.spent"), formatNumber(answer.spent), "credits-spent"),
          stat(t("credits.standing"), formatNumber(answer.standing, 1), "credits-standing"),
        ),
        h("p", { class: "hint" }, t("credits.explain")),
        h("h2", {}, t("credits.recent")),
        receiptsTable(answer.recent),
        h("h2", {}, t("credits.leaderboard")),
        leaderboardTable(answer.leaderboard),
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
