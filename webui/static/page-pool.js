// My devices: this node's pool (/api/pool/state) and private mode (/api/pool/private-mode).
// The owner invites devices with a one-use swarmpool:// code; a device pastes a code to
// join. Private mode routes this node's requests only through the pool's members (and,
// if allowed, peers on the local network); the node keeps serving everyone.
import { api } from "./api.js";
import { formatNumber, h, notice, shortId, table } from "./dom.js";
import { t } from "./i18n.js";

function field(label, input) {
  return h("label", { class: "field" }, h("span", {}, label), input);
}

function membersTable(pool) {
  return table(
    { "data-field": "pool-members" },
    ["device", "peer", "role", "joined"].map((key) => t(`pool.col.${key}`)),
    pool.members.map((member) =>
      h(
        "tr",
        { class: member.self ? "self" : "", "data-peer": member.peer_id },
        h("td", {}, member.device_name || (member.self ? t("pool.this_device") : "—")),
        h("td", { title: member.peer_id }, shortId(member.peer_id)),
        h("td", {}, t(member.owner ? "pool.role.owner" : "pool.role.member")),
        h("td", {}, new Date(member.joined_at * 1000).toLocaleString()),
      ),
    ),
  );
}

export function render(view) {
  let stopped = false;
  const status = h("section", { class: "card" }, h("p", { class: "hint" }, t("common.loading")));
  const privacy = h("section", { class: "card" });
  const message = h("div", { "aria-live": "polite" });
  view.append(h("h1", {}, t("pool.title")), message, status, privacy);

  const say = (text, kind = "info") => message.replaceChildren(notice(text, kind));
  const act = (promise, done) =>
    promise.then((answer) => !stopped && (done ? done(answer) : null, load())).catch((error) => !stopped && say(error.message, "error"));

  function renderState(state) {
    if (!state.pool) {
      const name = h("input", { id: "pool-name", required: true, maxlength: 64, placeholder: t("pool.name_placeholder") });
      const code = h("input", { id: "pool-code", required: true, placeholder: "swarmpool://…" });
      status.replaceChildren(
        h("h2", {}, t("pool.none")),
        h("p", { class: "hint", "data-field": "pool-role" }, state.removed ? t("pool.removed") : t("pool.none_hint")),
        h(
          "form",
          { class: "toolbar", onsubmit: (event) => (event.preventDefault(), act(api("/api/pool", { method: "POST", body: { name: name.value } }))) },
          field(t("pool.create_label"), name),
          h("button", { type: "submit", class: "primary" }, t("pool.create")),
        ),
        h(
          "form",
          { class: "toolbar", onsubmit: (event) => (event.preventDefault(), act(api("/api/pool/join", { method: "POST", body: { code: code.value.trim() } }), () => say(t("pool.joined")))) },
          field(t("pool.join_label"), code),
          h("button", { type: "submit", class: "primary" }, t("pool.join")),
        ),
      );
      return;
    }
    const pool = state.pool;
    const owner = state.role === "owner";
    const parts = [
      h("h2", {}, pool.name),
      h("p", { "data-field": "pool-role" }, t(owner ? "pool.you_own" : "pool.you_member", { count: formatNumber(pool.members.length) })),
      membersTable(pool),
    ];
    if (owner) {
      const codeBox = h("div", { class: "result" });
      parts.push(
        h(
          "div",
          { class: "actions" },
          h(
            "button",
            {
              type: "button",
              class: "primary",
              "data-action": "invite",
              onclick: () =>
                api("/api/pool/invitations", { method: "POST", body: {} })
                  .then((answer) => {
                    codeBox.replaceChildren(
                      h("p", {}, t("pool.code_hint", { expires: new Date(answer.expires * 1000).toLocaleString() })),
                      h("code", { class: "pool-code", "data-field": "pool-code" }, answer.code),
                      answer.warning ? notice(answer.warning, "info") : "",
                    );
                  })
                  .catch((error) => say(error.message, "error")),
            },
            t("pool.invite"),
          ),
        ),
        codeBox,
      );
    }
    parts.push(
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "danger", "data-action": "leave", onclick: () => confirm(t("pool.leave_confirm")) && act(api("/api/pool/leave", { method: "POST" })) }, t("pool.leave")),
      ),
    );
    status.replaceChildren(...parts);
  }

  function renderPrivacy(mode) {
    const toggle = h("input", { type: "checkbox", id: "private-mode", checked: mode.private_mode });
    const lan = h("input", { type: "checkbox", id: "private-lan", checked: mode.allow_lan });
    const save = () => act(api("/api/pool/private-mode", { method: "PUT", body: { private_mode: toggle.checked, allow_lan: lan.checked } }), () => say(t("pool.private_saved")));
    toggle.addEventListener("change", save);
    lan.addEventListener("change", save);
    privacy.replaceChildren(
      h("h2", {}, t("pool.private_title")),
      h("p", { class: "hint" }, t("pool.private_hint")),
      h("label", { class: "check" }, toggle, " ", t("pool.private_on")),
      h("label", { class: "check" }, lan, " ", t("pool.private_lan")),
      h("p", { "data-field": "private-mode" }, t(mode.private_mode ? "pool.private_state_on" : "pool.private_state_off", { count: formatNumber(mode.members) })),
      mode.warning ? notice(mode.warning, "info") : "",
    );
  }

  function load() {
    Promise.all([api("/api/pool/state"), api("/api/pool/private-mode")])
      .then(([state, mode]) => {
        if (stopped) return;
        renderState(state);
        renderPrivacy(mode);
      })
      .catch((error) => {
        if (!stopped) status.replaceChildren(notice(error.message));
      });
  }
  load();
  return () => {
    stopped = true;
  };
}
