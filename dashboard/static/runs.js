/* The runs list: polls /api/v1/dashboard/runs. */
"use strict";

(() => {
  const POLL_MS = 5000;

  function render(rows) {
    const table = document.getElementById("runs-table");
    const message = document.getElementById("runs-message");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    for (const r of rows) {
      const link = RG.el("a", { href: "/runs/" + encodeURIComponent(r.id), text: r.name });
      const alerts = RG.el("td", { class: "num" + (r.alerts_firing > 0 ? " alerting" : ""),
        text: String(r.alerts_firing) });
      body.append(RG.el("tr", { "data-run-id": r.id },
        RG.el("td", {}, link),
        RG.el("td", { text: r.project }),
        RG.el("td", {}, RG.el("span", { class: "badge " + r.status, text: r.status })),
        RG.el("td", { class: "num", text: RG.fmt(r.last_step) }),
        RG.el("td", { class: "num", text: RG.fmt(r.last_loss) }),
        alerts,
        RG.el("td", { text: RG.when(r.created_at) })));
    }
    table.hidden = rows.length === 0;
    message.textContent = rows.length === 0 ? "No runs yet: attach a Probe with server=… to a training script." : "";
    document.body.dataset.loaded = "1";
  }

  async function load() {
    try {
      const resp = await RG.api("/api/v1/dashboard/runs");
      if (!resp.ok) {
        document.getElementById("runs-message").textContent = await RG.errorText(resp);
      } else {
        render((await resp.json()).data);
      }
    } catch (e) {
      document.getElementById("runs-message").textContent = "server unreachable: " + e;
    }
    setTimeout(load, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", load);
})();
